"""The adapter directory: LoRA + fusion weights (safetensors), PEFT's adapter_config.json, lexlora
metadata and a model card. Written into a temp dir and renamed, so a crash never leaves a half
adapter under the final name. Never unpickles.

    adapter_config.json         PEFT LoraConfig (plain PEFT can load the LoRA part)
    adapter_model.safetensors   LoRA weights + lexical_fusion.proj.{weight,bias}; nothing of the base
    lexlora.json                base fingerprint, adapter spec, dataset, training args, metrics
    config.yaml                 the resolved run config (training only)
    metrics.jsonl               the training log (training only)
    loss_curve.png              training / validation loss by step (training only)
    eval/<split>/               `lexlora eval` reports, when run
    README.md                   model card
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lexlora
from lexlora.base import check_fingerprint, fingerprint, load_base_model, load_tokenizer
from lexlora.config import ModelConfig
from lexlora.errors import AdapterError
from lexlora.metadata import (  # noqa: F401  (re-exported: the adapter format's names)
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    META_NAME,
    WEIGHTS_NAME,
    file_sha256,
    read_metadata,
)
from lexlora.model import FUSION_PREFIX, AdapterSpec, LexLoraModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_staging_dir(final: str | Path) -> Path:
    """A temp dir beside `final` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes it private (0700); an adapter dir gets the usual permissions.
    staging.chmod(0o777 & ~_umask())
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(final: str | Path, overwrite: bool) -> None:
    final = Path(final)
    if final.exists() and not overwrite:
        raise AdapterError(
            f"output dir {final} already exists; choose another output_dir or set overwrite_output_dir=true"
        )
    if final.exists() and not final.is_dir():
        raise AdapterError(f"output dir {final} exists and is not a directory")


def publish(staging: Path, final: str | Path, overwrite: bool) -> Path:
    """Move a complete staging dir to `final`; an existing adapter is replaced only with `overwrite`,
    and only after the new one is complete."""
    final = Path(final)
    check_output_dir(final, overwrite)
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
        os.replace(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


def write_adapter_files(
    model: LexLoraModel,
    directory: str | Path,
    metadata: dict[str, Any],
    save_dtype: str = "float16",
) -> int:
    """Write weights, PEFT config, metadata and card into `directory`; returns the weights' size."""
    directory = Path(directory)
    dtype = DTYPES[save_dtype]
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.trainable_state_dict().items()}
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise AdapterError(
                f"weight {key} is not finite in {save_dtype}; nothing was saved "
                "(save_dtype=float32 keeps a wider range)"
            )
    weights = directory / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o666 & ~_umask())
    lora_config = model.peft_model.peft_config["default"]
    lora_config.save_pretrained(str(directory))
    meta = dict(metadata)
    meta.update(
        {
            "format_version": FORMAT_VERSION,
            "lexlora_version": lexlora.__version__,
            "adapter": model.spec.to_dict(),
            "weights": {
                "file": WEIGHTS_NAME,
                "sha256": file_sha256(weights),
                "dtype": save_dtype,
                "parameters": int(sum(v.numel() for v in state.values())),
                "bytes": weights.stat().st_size,
            },
        }
    )
    (directory / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    (directory / CARD_NAME).write_text(model_card(meta, directory.name))
    return weights.stat().st_size


def save_adapter(
    model: LexLoraModel,
    output_dir: str | Path,
    metadata: dict[str, Any],
    save_dtype: str = "float16",
    overwrite: bool = False,
) -> Path:
    """Save atomically: temp dir, then rename to `output_dir`."""
    check_output_dir(output_dir, overwrite)
    staging = make_staging_dir(output_dir)
    try:
        write_adapter_files(model, staging, metadata, save_dtype)
        return publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_weights(adapter_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise AdapterError(
                f"{adapter_dir}: only a pickle adapter_model.bin is present; lexlora loads safetensors only "
                "(pickle files can run code when loaded)"
            )
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    expected = meta["weights"].get("sha256")
    if expected and file_sha256(weights) != expected:
        raise AdapterError(f"{weights}: checksum differs from {META_NAME}; the file is corrupted or was replaced")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None


def spec_from_metadata(meta: dict[str, Any], source: str) -> AdapterSpec:
    try:
        return AdapterSpec(**meta["adapter"])
    except TypeError as exc:
        raise AdapterError(f"{source}: 'adapter' in {META_NAME} is not valid ({exc})") from None


def base_config_from_metadata(meta: dict[str, Any]) -> ModelConfig:
    base = meta["base"]
    return ModelConfig(
        name_or_path=base.get("model_id", ""),
        random_init=bool(base.get("random_init")),
        init_seed=int(base.get("init_seed") or 0),
        config_overrides=dict(base.get("config_overrides") or {}),
    )


@dataclass
class AdapterFiles:
    """An adapter dir read and checked, before anything is loaded onto a base."""

    path: Path
    meta: dict[str, Any]
    spec: AdapterSpec
    lora_config: LoraConfig
    state: dict[str, torch.Tensor]

    @property
    def weights_bytes(self) -> int:
        return (self.path / WEIGHTS_NAME).stat().st_size


def read_adapter_dir(adapter_dir: str | Path) -> AdapterFiles:
    """Read an adapter dir; an AdapterError says what is missing or corrupted."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    spec = spec_from_metadata(meta, str(adapter_dir))
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{adapter_dir}: {CONFIG_NAME} is missing")
    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise AdapterError(f"{config_path}: not a valid PEFT LoRA config ({exc})") from None
    state = read_weights(adapter_dir, meta)
    has_fusion = any(k.startswith(FUSION_PREFIX) for k in state)
    if has_fusion != spec.fusion_enabled:
        raise AdapterError(
            f"{adapter_dir}: {META_NAME} says fusion is {'on' if spec.fusion_enabled else 'off'} "
            f"but the weights {'have' if has_fusion else 'lack'} a fusion projection"
        )
    return AdapterFiles(adapter_dir, meta, spec, lora_config, state)


def load_adapter(
    adapter_dir: str | Path,
    base=None,
    tokenizer=None,
    base_config: ModelConfig | None = None,
) -> LexLoraModel:
    """Load one adapter onto a frozen base (the one named in its metadata unless `base` is given), as
    a PEFT model. For many adapters on one base, see `lexlora.registry.LexLoRA`.

    Refuses, with an AdapterError, a dir that is incomplete or corrupted, or whose base fingerprint
    differs from the loaded base."""
    files = read_adapter_dir(adapter_dir)
    base_config = base_config or base_config_from_metadata(files.meta)
    if base is None:
        base = load_base_model(base_config)
    check_fingerprint(files.meta["base"], fingerprint(base, base_config), str(files.path))
    if tokenizer is None:
        tokenizer = load_tokenizer(base_config)
    lora_config = files.lora_config
    lora_config.inference_mode = False
    model = LexLoraModel.create(base, tokenizer, lora_config, files.spec)
    model.load_trainable_state_dict(files.state, source=str(files.path / WEIGHTS_NAME))
    model.requires_grad_(False)
    model.eval()
    model.metadata = files.meta
    return model


def model_card(meta: dict[str, Any], name: str) -> str:
    adapter = meta["adapter"]
    base = meta["base"]
    weights = meta["weights"]
    fusion = (
        f"{adapter['fusion_mode']} (embedding of `{adapter['lexical_field']}` by {adapter['embedding_model']}, "
        f"{adapter['embedding_dim']} dims)"
        if adapter.get("fusion_mode")
        else "off"
    )
    metrics = meta.get("metrics") or {}
    metric_lines = "\n".join(f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, (dict, list)))
    samples = meta.get("samples") or []
    sample_lines = "\n".join(
        f"| {s['input']} | {s['reference']} | {s['output']} |".replace("\n", " ") for s in samples
    )
    init = f"random init (seed {base.get('init_seed')}), for tests only" if base.get("random_init") else "pretrained"
    return f"""# {name}

A lexlora adapter: LoRA + lexical fusion projection for `{base.get('model_id')}` ({init}).

- Prompt template: `{adapter['input_template']}`
- Target field: `{adapter['target_field']}`
- Fusion: {fusion}
- Weights: {weights['parameters']:,} parameters, {weights['bytes'] / 1e6:.2f} MB ({weights['dtype']})

## Use

```bash
lexlora generate --adapter {name} "some_input"
```

```python
from lexlora.adapters import load_adapter
model = load_adapter("{name}")
```

## Metrics

| metric | value |
|---|---|
{metric_lines}

## Samples (validation split, greedy)

| input | reference | output |
|---|---|---|
{sample_lines}
"""
