"""The project's own TFDS builders. Each lives in its own package because TFDS
looks for a builder's checksums file next to the module that defines it."""
