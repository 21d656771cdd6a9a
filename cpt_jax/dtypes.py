"""The float dtypes cpt_jax computes in and writes, by name, in one place."""

import ml_dtypes
import numpy as np

# Every float format a model's weights may be exported in (`convert export --dtype`), by name.
FLOATS = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

# The compute dtypes a run may use (`model.dtype`, besides "auto"). Not float16: its narrow exponent
# needs loss scaling, which the trainer does not do, and the fused cross-entropy's gradient would
# flush small entries to zero.
COMPUTE = ("float32", "bfloat16")
