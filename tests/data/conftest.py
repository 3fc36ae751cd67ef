"""Local stand-ins for Hugging Face datasets: an IMDB-like DatasetDict (text + ClassLabel label,
train / test / unsupervised with datasets' -1 'no label'), written as a dataset directory of
parquet files, and a private, offline datasets cache per test."""

import pytest

IMDB_NAMES = ["neg", "pos"]


def imdb_like(train=(0, 1, 0, 1, 0, 1, 0, 1), test=(1, 0), unsupervised=(-1,)):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=IMDB_NAMES)})

    def split(name, labels):
        texts = [f"{name} review {i}" for i in range(len(labels))]
        return datasets.Dataset.from_dict({"text": texts, "label": list(labels)}, features=features)

    return datasets.DatasetDict(
        {name: split(name, labels) for name, labels in
         (("train", train), ("test", test), ("unsupervised", unsupervised)) if labels}
    )


def write_dataset_dir(root, dataset_dict):
    """A dataset directory as on the Hub (IMDB's layout): one parquet file per split, named as
    load_dataset expects of any split name ("unsupervised" too): data/<split>-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, split in dataset_dict.items():
        split.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


@pytest.fixture()
def offline_datasets(tmp_path, monkeypatch):
    """A datasets cache of this test's own, with the Hub unreachable (offline), whatever the environment."""
    import datasets
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache
