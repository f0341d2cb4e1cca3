"""A tiny tfds dataset for tests: `tiny_docs`, built as array_record into a temporary directory.

tfds builders must live in an importable module (not `__main__`); importing this module registers
the builder under the name `tiny_docs`. `DatasetInfo` is built directly instead of with
`dataset_info_from_configs`, which looks for metadata files in the builder's package (and
`tests/` is not a package).
"""

import tensorflow_datasets as tfds

# (text, nested title) of each split's records; one empty text to check the skip.
RECORDS = {
    "train": [
        ("first document\nwith two lines", "a"),
        ("second document: ünïcode ✓", "b"),
        ("", "empty"),
        ("third document", "c"),
    ],
    "validation": [("held-out document", "v")],
}


class TinyDocs(tfds.core.GeneratorBasedBuilder):
    """Text records with a nested `meta.title` field."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "meta": {"title": tfds.features.Text()}}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in RECORDS}

    def _generate_examples(self, split):
        for i, (text, title) in enumerate(RECORDS[split]):
            yield i, {"text": text, "meta": {"title": title}}


def build(data_dir) -> str:
    """Prepares `tiny_docs` as array_record files under `data_dir`; returns `data_dir`."""
    TinyDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)
