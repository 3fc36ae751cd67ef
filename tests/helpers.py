"""Builders shared by the model, adapter and training tests."""

import torch

from lexlora.config import LoraSettings
from lexlora.model import AdapterSpec, LexLoraModel, build_lora_config


def make_model(base, tokenizer, mode="add", r=4, seed=0) -> LexLoraModel:
    spec = AdapterSpec(
        input_template="Describe {filename}:", target_field="description", lexical_field="filename",
        fusion_mode=mode, embedding_model="sentence-transformers/all-MiniLM-L6-v2" if mode else None,
        embedding_dim=384 if mode else None,
    )
    torch.manual_seed(seed)
    lora = build_lora_config(LoraSettings(r=r, alpha=2 * r, dropout=0.0), "t5", "google/flan-t5-small")
    return LexLoraModel.create(base, tokenizer, lora, spec)


@torch.no_grad()
def perturb_(model: LexLoraModel, seed=1) -> None:
    """Give every trainable weight a non-zero value, as training would."""
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def batch(tokenizer, texts=("backup_config.json", "a much longer file name for padding.py"), seed=0):
    enc = tokenizer([f"Describe {t}:" for t in texts], return_tensors="pt", padding=True)
    lexical = torch.randn(len(texts), 384, generator=torch.Generator().manual_seed(seed))
    labels = tokenizer(text_target=["a config backup", "a python file"], return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return enc.input_ids, enc.attention_mask, lexical, labels
