"""A run's data, ready for the model: records read and split, tokenized (a refused long target stops
here), then embedded for fusion, all before the base model loads."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lexlora.config import Config
from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.splits import load_splits
from lexlora.data.labels import LabelSet, class_weights, label_set
from lexlora.data.tokenization import EncodedSplit, encode_class_split, encode_split
from lexlora.fileio import file_sha256

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    splits: dict[str, EncodedSplit]
    lexical_field: str | None
    encoder: LexicalEncoder | None
    dataset_info: dict[str, Any]
    # A classifier's labels (sorted; id = index) and its loss weights per label (classifier.class_weights).
    labels: LabelSet | None = None
    class_weights: torch.Tensor | None = None

    @property
    def embedding_dim(self) -> int | None:
        vectors = self.splits["train"].lexical_embeds
        return int(vectors.shape[-1]) if vectors is not None else None


def prepare_data(cfg: Config, tokenizer, device, encoders: dict[tuple, LexicalEncoder] | None = None) -> PreparedData:
    """Read + validate records, tokenize (a refused long target stops here), then embed: all
    before any model work but the embedding model's. `encoders`: the lexical encoders of earlier
    jobs of a joint run by their settings, reused (one embedding model in memory) and added to."""
    splits, template, lexical_field = load_splits(cfg.data, cfg.fusion.enabled)
    labels = weights = None
    if cfg.classifies:
        # Checked before any tokenizing: empty labels, one class, a label only in validation/test.
        labels = label_set(splits, cfg.data.target_field, cfg.data.path)
        weights = class_weights(labels, splits["train"], cfg.data.target_field, cfg.classifier.class_weights)
        ids = {label: index for index, label in enumerate(labels.labels)}
        encoded = {
            name: encode_class_split(records, template, cfg.data.target_field, tokenizer, cfg.data, ids)
            for name, records in splits.items()
        }
    else:
        encoded = {
            name: encode_split(records, template, cfg.data.target_field, tokenizer, cfg.data, None, name)
            for name, records in splits.items()
        }
    encoder = None
    if cfg.fusion.enabled:
        settings = (cfg.fusion.embedding_model, cfg.fusion.cache_dir, cfg.fusion.embedding_batch_size, device)
        encoder = (encoders or {}).get(settings) or LexicalEncoder(*settings)
        if encoders is not None:
            encoders[settings] = encoder
        started = time.perf_counter()
        for name, records in splits.items():
            encoded[name].lexical_embeds = encoder.encode([r.fields[lexical_field] for r in records])
        logger.info(
            "lexical embeddings (%s): %d texts encoded, the rest from the cache, in %.1fs",
            cfg.fusion.embedding_model, encoder.encoded_count, time.perf_counter() - started,
        )
    path = Path(cfg.data.path)
    dataset_info = {
        "path": str(cfg.data.path),
        "sha256": file_sha256(path) if path.is_file() else None,
        "splits": {name: len(records) for name, records in splits.items()},
    }
    return PreparedData(encoded, lexical_field, encoder, dataset_info, labels, weights)
