import torch

from lexlora.data.embeddings import LexicalEncoder
from tests.conftest import EMBEDDING_MODEL


def test_encodes_each_distinct_text_once_and_caches_on_disk(tmp_path):
    encoder = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path, batch_size=4)
    texts = ["backup_config", "extract_window_events", "backup_config", "readme"]
    first = encoder.encode(texts)
    assert first.shape == (4, 384) and first.dtype == torch.float32
    assert encoder.encoded_count == 3
    assert torch.equal(first[0], first[2])
    assert list((tmp_path / EMBEDDING_MODEL.replace("/", "--")).glob("shard-*.safetensors"))

    # A second run (new encoder, same cache) encodes nothing and never loads the model.
    again = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path)
    second = again.encode(list(reversed(texts)))
    assert again.encoded_count == 0 and again._model is None
    assert torch.equal(second, first.flip(0))
    assert again.dim == 384


def test_embeddings_are_those_of_sentence_transformers(tmp_path):
    encoder = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path)
    vectors = encoder.encode(["main.py", "notes.txt"])
    direct = encoder.model.encode(["main.py", "notes.txt"], convert_to_tensor=True).float()
    assert torch.allclose(vectors, direct, atol=1e-5)
    # A lightly different text gets a different, but similar, vector.
    a, b = encoder.encode(["backup_config", "backup_configs"])
    assert 0.5 < torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.9999


def test_shards_are_merged(tmp_path, monkeypatch):
    import lexlora.data.embeddings as embeddings

    monkeypatch.setattr(embeddings, "MAX_SHARDS", 2)
    encoder = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path)
    for i in range(4):
        encoder.encode([f"file_{i}"])
    shards = list((tmp_path / EMBEDDING_MODEL.replace("/", "--")).glob("shard-*.safetensors"))
    assert len(shards) <= 2
    fresh = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path)
    fresh.encode([f"file_{i}" for i in range(4)])
    assert fresh.encoded_count == 0


def test_offline_the_model_loads_from_the_cache_without_hub_warnings(tmp_path, caplog, monkeypatch):
    """With HF_HUB_OFFLINE the Hub client logged "Could not reach the Hub ... Using cached commit hash"
    for every load unless asked for local files only."""
    import logging

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING):
        assert LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path).encode(["main.py"]).shape == (1, 384)
    assert not [r for r in caplog.records if "Could not reach the Hub" in r.getMessage()]


def test_a_memory_only_cache_keeps_the_latest_entries_and_writes_nothing(tmp_path, monkeypatch):
    """What a server uses: every request brings new texts, so the cache is bounded and never on disk."""
    monkeypatch.setenv("LEXLORA_CACHE", str(tmp_path))
    encoder = LexicalEncoder(EMBEDDING_MODEL, memory_only=3)
    first = encoder.encode(["a.py", "b.py"])
    encoder.encode(["c.py", "d.py"])
    assert len(encoder.cache.load()) == 3  # a.py, the oldest, was dropped
    assert not list(tmp_path.rglob("*.safetensors"))
    count = encoder.encoded_count
    again = encoder.encode(["b.py"])  # still cached: not encoded again
    assert encoder.encoded_count == count and torch.equal(again[0], first[1])
    encoder.encode(["a.py"])  # dropped: encoded again
    assert encoder.encoded_count == count + 1
