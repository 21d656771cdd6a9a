from cpt_jax.data.builders.text_files.text_files import FORMATS, TextFiles, TextFilesConfig, eval_cutoff, read_documents

__all__ = ["FORMATS", "TextFiles", "TextFilesConfig", "eval_cutoff", "read_documents"]
