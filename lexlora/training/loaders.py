"""The loaders phase's parts: the shuffled (optionally length-grouped) train loader and the
validation loader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from lexlora.config import Config
from lexlora.data.tokenization import EncodedSplit


def train_data_loader(split: EncodedSplit, cfg: Config, collator, generator: torch.Generator) -> DataLoader:
    """Shuffled batches drawn from `generator`; with train.group_by_length, of similar lengths."""
    sampler = (
        LengthGroupedSampler(cfg.train.batch_size, lengths=split.token_lengths(), generator=generator)
        if cfg.train.group_by_length
        else None
    )
    # The loader draws its worker base seed from `generator` too, not from the global RNG that
    # dropout uses, so that a resumed run's dropout masks match an uninterrupted run's.
    return DataLoader(split, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      collate_fn=collator, generator=generator, num_workers=cfg.train.num_workers)


def validation_loader(split: EncodedSplit, cfg: Config, collator) -> DataLoader:
    """The validation split in order, in batches of train.eval_batch_size."""
    return DataLoader(split, batch_size=cfg.train.eval_batch_size, collate_fn=collator, num_workers=cfg.train.num_workers)
