"""The classes a prepared TFDS dataset may name. Its `features.json` (and `dataset_info.json`)
give each feature a Python class by its dotted name, and TFDS imports that name's module to read
the dataset: a downloaded or shared dataset naming another module would run its code. Every
name is checked against `tensorflow_datasets.core.features`' own classes before TFDS reads any.

Our own builders (bible, files) are unaffected: TFDS takes their features from our code."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from etils import epath
from tensorflow_datasets.core import features as tfds_features

# tensorflow_datasets.core.features' classes, as TFDS names them in files (with their old names).
ALLOWED = frozenset(
    name for c in vars(tfds_features).values() if isinstance(c, type) and issubclass(c, tfds_features.FeatureConnector)
    for name in (f"{c.__module__}.{c.__name__}", *c.__dict__.get("ALIASES", ())))
_FILES = ("features.json", "dataset_info.json")


def class_names(value: Any) -> Iterator[str]:
    """Every class name in a TFDS metadata document: `pythonClassName` (`python_class_name`),
    the legacy `type` beside `content`, also in JSON held in a string (a JsonFeature's)."""
    if isinstance(value, dict):
        for key, v in value.items():
            if key in ("pythonClassName", "python_class_name") or (key == "type" and "content" in value):
                yield v if isinstance(v, str) else repr(v)
            else:
                yield from class_names(v)
    elif isinstance(value, list):
        for v in value:
            yield from class_names(v)
    elif isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            inner = json.loads(value)
        except ValueError:
            return
        yield from class_names(inner)


def check(data_dir: str, tfds_name: str) -> None:
    """Raise ValueError naming the file and the class unless every class that the metadata of
    dataset `tfds_name` ("name[/config][:version]") in `data_dir` names, in any of its configs
    and versions, is ALLOWED."""
    root = epath.Path(data_dir).expanduser() / re.split(r"[/:]", tfds_name)[0]
    for name in _FILES:
        for path in [*root.glob(f"*/{name}"), *root.glob(f"*/*/{name}")]:
            try:
                bad = next((c for c in class_names(json.loads(path.read_text())) if c not in ALLOWED), None)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: malformed JSON ({type(e).__name__})") from None
            if bad is not None:
                raise ValueError(f"{path}: names the class {bad}, not a tensorflow_datasets.core.features class; "
                                 f"TFDS would import its module to read the dataset")
