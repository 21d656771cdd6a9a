from cpt_jax.data.builders.bible.bible import EVAL_FRACTION, Bible

__all__ = ["EVAL_FRACTION", "Bible"]
