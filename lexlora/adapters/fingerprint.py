"""The base fingerprint an adapter records, so that it is never loaded onto a base it was not trained on."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lexlora.adapters.format import PEFT_PREFIX
from lexlora.config import ModelConfig
from lexlora.errors import AdapterError
from lexlora.model.families import ENCODER_DECODER_TYPE, is_warm_start

logger = logging.getLogger(__name__)


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
        # the same base, whether or not PEFT has wrapped it already (LoRA layers, modules_to_save copies)
        if "lora_" not in name and ".modules_to_save." not in name
    ]
    arch = hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()
    rows = [base.get_input_embeddings().weight[:16]]
    if base.config.model_type == ENCODER_DECODER_TYPE:
        # Its cross-attention may be new (a warm start, seeded): tell one initialisation from another.
        rows += [p[:16] for n, p in base.named_parameters() if "crossattention" in n and "lora_" not in n
                 and "modules_to_save" not in n][:1]
    digest = hashlib.sha256()
    for tensor in rows:
        digest.update(tensor.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return {
        "model_id": model.name_or_path,
        "model_type": base.config.model_type,
        "vocab_size": vocab_size(base),
        "architecture_sha256": arch,
        "weights_sha256": digest.hexdigest(),
        "random_init": model.random_init,
        "init_seed": model.init_seed if model.random_init or is_warm_start(model.name_or_path) else None,
        "config_overrides": dict(model.config_overrides),
        "task": model.task,  # seq2seq or classification (the encoder alone): a base hosts one kind
    }


def vocab_size(base: PreTrainedModel) -> int:
    """The output vocabulary (an EncoderDecoderConfig has no vocab_size of its own: its decoder's)."""
    config = base.config
    if getattr(config, "vocab_size", None) is None and hasattr(config, "decoder"):
        config = config.decoder
    return int(config.vocab_size)


def _logical_shape(modules: dict[str, nn.Module], name: str, param: torch.Tensor) -> list[int]:
    """A Linear weight as (out_features, in_features) whatever its storage (bitsandbytes packs 4-bit
    weights into a (n, 1) uint8 tensor); every other parameter as its own shape."""
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if leaf == "weight" and isinstance(module, nn.Linear):
        return [int(module.out_features), int(module.in_features)]
    return list(param.shape)


def _base_parameter_name(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], adapter_dir: str) -> None:
    """Refuse an adapter whose base differs from the loaded one, saying how."""

    def describe(fp: dict[str, Any]) -> str:
        init = f"random init, seed {fp.get('init_seed')}" if fp.get("random_init") else "pretrained weights"
        overrides = f", config overrides {fp['config_overrides']}" if fp.get("config_overrides") else ""
        return f"{fp.get('model_id')} ({fp.get('model_type')}, vocab {fp.get('vocab_size')}, {init}{overrides})"

    saved_task, current_task = saved.get("task", "seq2seq"), current.get("task", "seq2seq")
    if saved_task != current_task:
        kinds = {"seq2seq": "a generation (seq2seq) adapter", "classification": "a classifier-head adapter"}
        raise AdapterError(
            f"{adapter_dir}: this is {kinds.get(saved_task, saved_task)}, and the loaded base serves "
            f"{current_task} adapters only (the base was loaded with model.task={current_task}; a classifier's "
            "base is the encoder alone). Load it onto a base of its own kind, e.g. LexLoRA.for_adapter(dir)."
        )
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
