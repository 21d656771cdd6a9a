from cpt_jax.data.builders.text_files.text_files import (
    BAD_DOCUMENTS,
    FORMATS,
    BadDocument,
    Skipped,
    TextFiles,
    TextFilesConfig,
    good_documents,
    read_documents,
)

__all__ = ["BAD_DOCUMENTS", "FORMATS", "BadDocument", "Skipped", "TextFiles", "TextFilesConfig", "good_documents",
           "read_documents"]
