"""Lexical embeddings: a SentenceTransformer by model id, each distinct text encoded once, cached on
disk as safetensors so that a second run encodes nothing.

Cache layout: <cache_dir>/<model id with / as -->/shard-*.safetensors, one tensor per text, named by
the SHA-256 of the text. Shards are written to a temp file and renamed, so a crash never leaves a
half shard; they are merged when there are many.

A server embeds texts it has never seen at every request; there `MemoryCache` keeps the latest
`max_entries` vectors in memory only, so the cache neither grows without bound nor writes to disk
per request.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lexlora.errors import ModelLoadError
from lexlora.fileio import staging_prefix

logger = logging.getLogger(__name__)


MAX_SHARDS = 8
PROGRESS_BAR_MIN_TEXTS = 256


def default_cache_dir() -> Path:
    root = os.environ.get("LEXLORA_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lexlora"
    return base / "embeddings"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Text -> vector store for one embedding model."""

    def __init__(self, cache_dir: str | Path | None, model_id: str):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.dir = self.dir / model_id.replace("/", "--")
        self._vectors: dict[str, torch.Tensor] | None = None

    def _shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else []

    def load(self) -> dict[str, torch.Tensor]:
        if self._vectors is None:
            vectors: dict[str, torch.Tensor] = {}
            for shard in self._shards():
                try:
                    with safe_open(str(shard), framework="pt") as handle:
                        for key in handle.keys():
                            vectors[key] = handle.get_tensor(key)
                except Exception as exc:  # a corrupted shard is only a cache miss
                    logger.warning("ignoring unreadable embedding cache shard %s (%s)", shard, exc)
            self._vectors = vectors
        return self._vectors

    def add(self, new: dict[str, torch.Tensor]) -> None:
        if not new:
            return
        vectors = self.load()
        vectors.update(new)
        self.dir.mkdir(parents=True, exist_ok=True)
        shards = self._shards()
        if len(shards) + 1 > MAX_SHARDS:
            self._write(vectors)
            for shard in shards:
                shard.unlink(missing_ok=True)
        else:
            self._write(new)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=staging_prefix(self.dir / name), suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.dir / name)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            logger.warning("could not write the embedding cache in %s (%s); continuing without it", self.dir, exc)


class MemoryCache:
    """The most recently added `max_entries` vectors, in memory only (oldest dropped first)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._vectors: dict[str, torch.Tensor] = {}

    def load(self) -> dict[str, torch.Tensor]:
        return self._vectors

    def add(self, new: dict[str, torch.Tensor]) -> None:
        self._vectors.update(new)
        excess = len(self._vectors) - self.max_entries
        for key in list(itertools.islice(self._vectors, max(excess, 0))):
            del self._vectors[key]


class LexicalEncoder:
    """Encodes texts with a SentenceTransformer, deduplicated, batched and cached.

    The model is loaded only when some text is not in the cache."""

    def __init__(
        self,
        model_id: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        memory_only: int | None = None,
    ):
        """`memory_only`: keep at most this many vectors in memory instead of the disk cache (serving)."""
        self.model_id = model_id
        self.batch_size = batch_size
        self.device = str(device) if device is not None else None
        self.cache = MemoryCache(memory_only) if memory_only else EmbeddingCache(cache_dir, model_id)
        self._model = None
        self.encoded_count = 0  # texts run through the model (not found in the cache) so far

    @property
    def model(self):
        if self._model is None:
            from huggingface_hub import constants
            from sentence_transformers import SentenceTransformer

            try:
                # Offline, ask for cached files only: otherwise the Hub client first tries the network and
                # logs "Could not reach the Hub ... Using cached commit hash" for every model loaded.
                self._model = SentenceTransformer(
                    self.model_id, device=self.device, local_files_only=constants.HF_HUB_OFFLINE
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"could not load the embedding model {self.model_id!r} ({type(exc).__name__}: {exc}). "
                    "Check the id, your network, or HF_HUB_CACHE / HF_HUB_OFFLINE for an offline cache."
                ) from None
        return self._model

    @property
    def dim(self) -> int:
        cached = self.cache.load()
        if cached:
            return int(next(iter(cached.values())).shape[-1])
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) float32 vectors, in the order of `texts`."""
        keys = [text_key(t) for t in texts]
        cached = self.cache.load()
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key not in cached and key not in missing:
                missing[key] = text
        self.encoded_count += len(missing)
        if missing:
            vectors = self.model.encode(
                list(missing.values()),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                show_progress_bar=len(missing) >= PROGRESS_BAR_MIN_TEXTS,
            )
            vectors = vectors.detach().to("cpu", torch.float32)
            self.cache.add({key: vectors[i].clone() for i, key in enumerate(missing)})
            cached = self.cache.load()
        if not keys:
            return torch.empty(0, self.dim)
        return torch.stack([cached[key] for key in keys])
