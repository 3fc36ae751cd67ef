"""Offline test setup: the HF cache in ../shared (real flan-t5-small tokenizer + config, real
all-MiniLM-L6-v2), tiny random T5 bases, and a private embedding cache per test session."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Must happen before huggingface_hub is imported: it reads these at import time.
if (SHARED / "hf" / "hub").is_dir():
    os.environ.setdefault("HF_HUB_CACHE", str(SHARED / "hf" / "hub"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lexlora.config import Config, ModelConfig  # noqa: E402

FILE_DESCRIPTIONS = SHARED / "data" / "file-descriptions"
TINY_T5 = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2}
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def tiny_model_config(seed: int = 0, **overrides) -> ModelConfig:
    return ModelConfig(
        name_or_path="google/flan-t5-small", random_init=True, init_seed=seed,
        config_overrides={**TINY_T5, **overrides},
    )


@pytest.fixture(scope="session", autouse=True)
def embedding_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lexlora-cache")
    os.environ["LEXLORA_CACHE"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tokenizer():
    from lexlora.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_config())


@pytest.fixture()
def tiny_base():
    from lexlora.model.loading import load_base_model

    return load_base_model(tiny_model_config())


@pytest.fixture()
def stdlib_data():
    return ROOT / "examples" / "python_stdlib.jsonl"


def tiny_train_config(tmp_path: Path, data: Path, **train) -> Config:
    """A whole-run config on a tiny base that trains in seconds."""
    config = Config()
    config.model = tiny_model_config()
    config.data.path = str(data)
    config.data.input_template = "Describe the file {filename}:"
    config.data.target_field = "description"
    config.data.splits = {"train": "[:64]", "validation": "[64:80]"}
    config.data.max_target_length = 32
    config.train.max_steps = train.pop("max_steps", 8)
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.learning_rate = 3e-3
    for key, value in train.items():
        setattr(config.train, key, value)
    config.generation.max_new_tokens = 8
    config.output_dir = str(tmp_path / "adapter")
    return config


def requires_shared_data():
    return pytest.mark.skipif(
        not FILE_DESCRIPTIONS.is_dir(), reason="../shared/data/file-descriptions is not on this machine"
    )


def random_lexical(batch: int, dim: int = 384, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
