"""Builders shared by the model, adapter and training tests."""

import json
import time

import torch

from lexlora.config import LoraSettings
from tests.conftest import TINY_T5
from lexlora.data.spec import AdapterSpec
from lexlora.model.factory import build_model
from lexlora.model.lora_model import LexLoraModel


def make_model(base, tokenizer, mode="add", r=4, seed=0) -> LexLoraModel:
    """A fresh adapter on a tiny T5 base (fusion `mode`, None: off), LoRA of rank `r`."""
    return make_model_for(base, tokenizer, "google/flan-t5-small", mode, r, seed)


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


# ---- tiny bases of other families, saved to a directory and loaded by path like a Hub id ---------

TINY_BART = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 128}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 128}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def save_tiny_bart(path, kind="bart", seed=0):
    """A tiny random BART or mBART with the flan-t5-small tokenizer (the one in the offline cache),
    saved with it to `path`: `ModelConfig(name_or_path=str(path))` loads it as it would a Hub id."""
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        MBartConfig,
        MBartForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained("google/flan-t5-small")
    config_class, model_class = {"bart": (BartConfig, BartForConditionalGeneration),
                                 "mbart": (MBartConfig, MBartForConditionalGeneration)}[kind]
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.pad_token_id,
           "forced_eos_token_id": None}
    config = config_class(vocab_size=len(tokenizer), **TINY_BART, **ids)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path, seed=0):
    """A tiny random BERT encoder (all-MiniLM-L6-v2's tokenizer and vocabulary) saved to `path`: the
    halves of a warm-started encoder-decoder, `encoder-decoder:PATH`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tokenizer), **TINY_BERT)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert2bert(path, bert_path, seed=0):
    """A whole EncoderDecoderModel (tiny BERT -> BERT, warm-started from `bert_path`) saved as one
    checkpoint: what a user gets from the Hub as a trained bert2bert, loaded by AutoModelForSeq2SeqLM."""
    from transformers import AutoTokenizer, EncoderDecoderModel

    torch.manual_seed(seed)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(bert_path), str(bert_path))
    tokenizer = AutoTokenizer.from_pretrained(str(bert_path))
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_model_for(base, tokenizer, model_id, mode="add", r=4, seed=0, **lora) -> LexLoraModel:
    """`make_model` for any base: LoRA targets (and modules trained in full) from the base's type."""
    spec = AdapterSpec(
        input_template="Describe {filename}:", target_field="description", lexical_field="filename",
        fusion_mode=mode, embedding_model=MINILM if mode else None, embedding_dim=384 if mode else None,
    )
    torch.manual_seed(seed)
    return build_model(base, tokenizer, spec, LoraSettings(r=r, alpha=2 * r, dropout=0.0, **lora), base_id=model_id)


def save_family_bases(root) -> dict:
    """The tiny bases of every supported family under `root`, by kind: name_or_path for ModelConfig."""
    from pathlib import Path

    root = Path(root)
    bert = save_tiny_bert(root / "bert")
    return {
        "bart": str(save_tiny_bart(root / "bart", "bart")),
        "mbart": str(save_tiny_bart(root / "mbart", "mbart")),
        "warm-start": f"encoder-decoder:{bert}",
        "bert2bert": str(save_tiny_bert2bert(root / "bert2bert", bert)),
    }


TINY_YAML = """
model:
  name_or_path: google/flan-t5-small
  random_init: true
  config_overrides: {overrides}
data:
  path: {data}
  input_template: "Describe the file {{filename}}:"
  target_field: description
  splits: {{train: "[:32]", validation: "[32:40]"}}
train:
  max_steps: 4
  batch_size: 8
  log_every: 2
generation:
  max_new_tokens: 6
"""


def write_config(tmp_path, data):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=data))
    return path


def wait_until(condition, what, timeout=20.0, poll=0.002):
    """Poll `condition` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
