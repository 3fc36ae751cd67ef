"""The frozen base: tokenizer and seq2seq model by id, random init on request, 8-bit / 4-bit weights
through bitsandbytes on CUDA (model.quantization), and a fingerprint that adapters record so they are
never loaded onto a base they were not trained on."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from lexlora.config import QUANTIZATION, ModelConfig
from lexlora.errors import AdapterError, ConfigError, ModelLoadError

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


def check_quantization(model: ModelConfig) -> None:
    """Refuse model.quantization=8bit/4bit up front (before any data or model work) where it cannot
    run: it needs a CUDA GPU and the bitsandbytes package."""
    if model.quantization == "none":
        return
    if model.quantization not in QUANTIZATION:
        raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATION)}; got {model.quantization!r}")
    switch = f"model.quantization={model.quantization}"
    needs = f"{switch} loads the base's weights through bitsandbytes, which needs a CUDA GPU and the bitsandbytes package"
    if not torch.cuda.is_available():
        raise ConfigError(f"{needs}; this machine has no CUDA device. Use model.quantization=none here.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{needs}; bitsandbytes is not installed (pip install bitsandbytes), or use model.quantization=none.")


def quantization_config(quantization: str):
    """transformers' BitsAndBytesConfig for model.quantization (None for none): LLM.int8 for 8bit,
    NF4 with double quantization and bf16 compute for 4bit (QLoRA's recipe)."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATION)}; got {quantization!r}")


def is_quantized(base: nn.Module) -> bool:
    """Whether the base's weights are k-bit (bitsandbytes), i.e. need PEFT's k-bit preparation."""
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def load_base_model(model: ModelConfig, device: int | str | torch.device | None = None) -> PreTrainedModel:
    """The base seq2seq model, frozen and in eval mode.

    With model.quantization=8bit/4bit the weights are loaded through bitsandbytes straight onto the
    CUDA device `device` (default: the current one, which Accelerate sets per process); elsewhere the
    base is on the CPU and the caller moves it."""
    check_quantization(model)
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
        if model.quantization != "none":
            # bitsandbytes quantizes while loading weights: save the random base, load it back quantized
            # (the same weights as the full-precision random base, so adapters move between the two).
            with tempfile.TemporaryDirectory(prefix="lexlora-random-base-") as tmp:
                base.save_pretrained(tmp)
                del base
                base = _load_quantized(tmp, model, device)
    else:
        if model.config_overrides:
            raise ModelLoadError(
                "model.config_overrides only applies with model.random_init=true "
                "(pretrained weights fix the architecture)"
            )
        try:
            if model.quantization != "none":
                base = _load_quantized(model.name_or_path, model, device)
            else:
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


def _load_quantized(path: str, model: ModelConfig, device: int | str | torch.device | None) -> PreTrainedModel:
    if device is None:
        device = torch.cuda.current_device()
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":
        raise ConfigError(f"model.quantization={model.quantization} needs the base on a CUDA device, not {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    base = AutoModelForSeq2SeqLM.from_pretrained(
        path, quantization_config=quantization_config(model.quantization), device_map={"": index}
    )
    logger.info("base weights loaded in %s through bitsandbytes on cuda:%d", model.quantization, index)
    return base


def fingerprint(base: PreTrainedModel, model: ModelConfig) -> dict[str, Any]:
    """What an adapter needs of its base: the architecture (every parameter's name and shape), the
    vocabulary size, and a digest of the first embedding rows that tells one set of weights from
    another (rounded through bf16 so fp32, bf16 and fp16 loads of the same weights agree).

    Shapes are logical, so an 8-bit or 4-bit load of a base (whose packed weights have other shapes)
    has the fingerprint of its full-precision load, and a QLoRA adapter loads on the full base."""
    modules = dict(base.named_modules(remove_duplicate=False))
    shapes = [
        (_base_parameter_name(name), _logical_shape(modules, name, p))
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


def _logical_shape(modules: dict[str, nn.Module], name: str, param: torch.Tensor) -> list[int]:
    """A Linear weight as (out_features, in_features) whatever its storage (bitsandbytes packs 4-bit
    weights into a (n, 1) uint8 tensor); every other parameter as its own shape."""
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if leaf == "weight" and isinstance(module, nn.Linear):
        return [int(module.out_features), int(module.in_features)]
    return list(param.shape)


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
