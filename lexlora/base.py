"""The frozen base: tokenizer and seq2seq model by id, random init on request, and a fingerprint that
adapters record so they are never loaded onto a base they were not trained on."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from lexlora.config import ModelConfig
from lexlora.errors import AdapterError, ModelLoadError

logger = logging.getLogger(__name__)

# LoRA targets per architecture: the attention projections.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    "umt5": ["q", "k", "v", "o"],
    "longt5": ["q", "k", "v", "o"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "mbart": ["q_proj", "k_proj", "v_proj", "out_proj"],
}

# T5-family models overflow in fp16 (they were trained in bf16).
FP16_UNSAFE = {"t5", "mt5", "umt5", "longt5"}


def default_target_modules(model_type: str) -> list[str]:
    if model_type not in ATTENTION_TARGETS:
        raise ModelLoadError(
            f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules"
        )
    return list(ATTENTION_TARGETS[model_type])


def load_tokenizer(model: ModelConfig):
    try:
        return AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the tokenizer of {model.name_or_path!r} ({type(exc).__name__}: {exc}). "
            "Check the id and your network, or HF_HUB_CACHE / HF_HUB_OFFLINE for an offline cache."
        ) from None


def load_base_model(model: ModelConfig) -> PreTrainedModel:
    """The base seq2seq model, frozen and in eval mode."""
    if model.random_init:
        try:
            config = AutoConfig.from_pretrained(model.name_or_path, **model.config_overrides)
        except Exception as exc:
            raise ModelLoadError(f"could not load the config of {model.name_or_path!r} ({exc})") from None
        # A fixed seed makes the random base reproducible, so an adapter trained on it can be reloaded.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            base = AutoModelForSeq2SeqLM.from_config(config)
        logger.warning(
            "model.random_init=true: %s built from its config with random weights (seed %d); "
            "for tests and benchmarks only", model.name_or_path, model.init_seed,
        )
    else:
        if model.config_overrides:
            raise ModelLoadError(
                "model.config_overrides only applies with model.random_init=true "
                "(pretrained weights fix the architecture)"
            )
        try:
            base = AutoModelForSeq2SeqLM.from_pretrained(model.name_or_path)
        except OSError as exc:
            raise ModelLoadError(
                f"could not load the weights of {model.name_or_path!r}: {exc}\n"
                f"Download them first (e.g. `hf download {model.name_or_path}` on a machine with network, "
                "or point HF_HUB_CACHE at a cache that has them), or, for tests and benchmarks only, "
                "set model.random_init=true to build the same shape with random weights."
            ) from None
    base.requires_grad_(False)
    base.eval()
    return base


def fingerprint(base: PreTrainedModel, model: ModelConfig) -> dict[str, Any]:
    """What an adapter needs of its base: the architecture (every parameter's name and shape), the
    vocabulary size, and a digest of the first embedding rows that tells one set of weights from
    another (rounded through bf16 so fp32, bf16 and fp16 loads of the same weights agree)."""
    shapes = [
        (_base_parameter_name(name), list(p.shape))
        for name, p in base.named_parameters(remove_duplicate=False)
        if "lora_" not in name  # the same base, whether or not PEFT has wrapped it already
    ]
    arch = hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()
    rows = base.get_input_embeddings().weight[:16].detach().to("cpu", torch.bfloat16).float()
    weights = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    return {
        "model_id": model.name_or_path,
        "model_type": base.config.model_type,
        "vocab_size": int(base.config.vocab_size),
        "architecture_sha256": arch,
        "weights_sha256": weights,
        "random_init": model.random_init,
        "init_seed": model.init_seed if model.random_init else None,
        "config_overrides": dict(model.config_overrides),
    }


def _base_parameter_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], adapter_dir: str) -> None:
    """Refuse an adapter whose base differs from the loaded one, saying how."""

    def describe(fp: dict[str, Any]) -> str:
        init = f"random init, seed {fp.get('init_seed')}" if fp.get("random_init") else "pretrained weights"
        overrides = f", config overrides {fp['config_overrides']}" if fp.get("config_overrides") else ""
        return f"{fp.get('model_id')} ({fp.get('model_type')}, vocab {fp.get('vocab_size')}, {init}{overrides})"

    for key, what in (
        ("model_type", "model type"),
        ("vocab_size", "vocabulary size"),
        ("architecture_sha256", "architecture (parameter names and shapes)"),
        ("weights_sha256", "weights"),
    ):
        if saved.get(key) != current.get(key):
            values = [str(fp.get(key)) for fp in (saved, current)]
            if key.endswith("sha256"):
                values = [v[:12] for v in values]
            raise AdapterError(
                f"{adapter_dir}: this adapter was trained on a different base ({what} differ: "
                f"{values[0]} vs {values[1]}).\n"
                f"  adapter's base: {describe(saved)}\n  loaded base:    {describe(current)}\n"
                "Load it onto the base it was trained on."
            )
    if saved.get("model_id") != current.get("model_id"):
        logger.warning(
            "%s: adapter's base id %r differs from the loaded %r, but the fingerprints match",
            adapter_dir, saved.get("model_id"), current.get("model_id"),
        )
