"""The project's own TFDS builders. Each lives in its own package because TFDS
looks for a builder's checksums file next to the module that defines it."""

import tensorflow_datasets as tfds


def text_info(builder: tfds.core.DatasetBuilder, description: str,
              metadata: tfds.core.Metadata | None = None) -> tfds.core.DatasetInfo:
    """Both builders' examples: one `text` string per document, kept in the order generated
    (canonical chapter or file order; consumers shuffle as they need)."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
        metadata=metadata,
    )
