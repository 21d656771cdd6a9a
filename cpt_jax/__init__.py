"""cpt_jax: cross-lingual continual pre-training at scale, in JAX.

In a notebook: `model, tokenizer = cpt_jax.load(PATH)` (a run, an HF model dir, a .gguf file), then
`cpt_jax.generate(model, tokenizer, "prompt")`.
"""


def __getattr__(name: str):
    # Lazy: `python -m cpt_jax.data.prepare` and friends should not import the model stack.
    if name == "models":
        import cpt_jax.models
        import cpt_jax.inference  # noqa: F401  (gives `cpt_jax.models.load`, the loader's old name)

        return cpt_jax.models
    if name == "load":
        from cpt_jax.inference import load

        return load
    if name == "generate":
        from cpt_jax.generation import generate

        return generate
    raise AttributeError(f"module 'cpt_jax' has no attribute {name!r}")
