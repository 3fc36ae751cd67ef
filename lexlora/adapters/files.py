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

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from lexlora.adapters.card import model_card
from lexlora.adapters.fingerprint import check_fingerprint, fingerprint
from lexlora.adapters.format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    META_NAME,
    PEFT_PREFIX,
    PICKLE_NAME,
    WEIGHTS_NAME,
    AdapterMetadata,
    WeightsRecord,
    matches_target,
    read_metadata,
    targeted,
    write_metadata,
)
from lexlora.config import FUSION_MODES, MODEL_TASKS, SAVE_DTYPES, ModelConfig
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError, ConfigError
from lexlora.fileio import current_umask, file_sha256, make_staging_dir, os_reason
from lexlora.model.classifier import CLASSIFIER_SECTION, ClassifierSpec, LexClassifierModel
from lexlora.model.fusion import FUSION_PREFIX
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.model.lora_model import LexLoraModel
from lexlora.version import __version__

logger = logging.getLogger(__name__)

# save_dtype name -> torch dtype (the names are the config's SAVE_DTYPES, which are torch's own).
DTYPES = {name: getattr(torch, name) for name in SAVE_DTYPES}


def check_output_dir(final: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, an output dir that exists (unless `overwrite`) or that cannot be
    written: the adapter is written beside it and renamed, so its parent must be writable."""
    final = Path(final)
    if final.exists() and not overwrite:
        what = "an adapter" if (final / META_NAME).is_file() else "something"
        raise AdapterError(
            f"output dir {final} already exists and holds {what}; choose another output_dir or set "
            "overwrite_output_dir=true (lexlora train --overwrite) to replace it once the new one is complete"
        )
    if final.exists() and not final.is_dir():
        raise AdapterError(f"output dir {final} exists and is not a directory")
    parent = final.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AdapterError(f"output dir {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AdapterError(f"output dir {final}: {parent} is not writable ({os.strerror(errno.EACCES)})")


def publish(staging: Path, final: str | Path, overwrite: bool) -> Path:
    """Move a complete staging dir to `final`; an existing adapter is replaced only with `overwrite`,
    and only after the new one is complete. If a rename fails, the old adapter is put back."""
    final = Path(final)
    check_output_dir(final, overwrite)
    try:
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, backup)
            try:
                os.replace(staging, final)
            except OSError:
                os.replace(backup, final)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, final)
    except OSError as exc:
        raise AdapterError(
            f"cannot move the new adapter into {final} ({os_reason(exc)}); what was at {final} is unchanged"
        ) from None
    return final


def require_finite(state: dict[str, torch.Tensor], dtype: str, outcome: str, hint: str) -> None:
    """Refuse, before anything is written, weights that overflow the dtype they are saved in."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterError(f"weight {key} is not finite in {dtype}; {outcome} ({hint})")


def write_adapter_files(
    model: LexLoraModel,
    directory: str | Path,
    metadata: AdapterMetadata | dict[str, Any],
    save_dtype: str = "float16",
) -> int:
    """Write weights, PEFT config, metadata and card into `directory`; returns the weights' size.
    A failed write (disk full, permissions) is an AdapterError; `directory` is a staging dir, so
    nothing under the final name is touched."""
    try:
        return _write_adapter_files(model, Path(directory), metadata, save_dtype)
    except OSError as exc:
        raise AdapterError(
            f"cannot write the adapter files into {directory} ({os_reason(exc)}); nothing was published, and an "
            "adapter already in the output dir is unchanged"
        ) from None


def _write_adapter_files(model: LexLoraModel, directory: Path, metadata: AdapterMetadata | dict[str, Any], save_dtype: str) -> int:
    dtype = DTYPES[save_dtype]
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.trainable_state_dict().items()}
    require_finite(state, save_dtype, "nothing was saved", "save_dtype=float32 keeps a wider range")
    weights = directory / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o666 & ~current_umask())
    lora_config = model.peft_model.peft_config[model.adapter_name]
    lora_config.save_pretrained(str(directory))
    sections = metadata.to_dict() if isinstance(metadata, AdapterMetadata) else dict(metadata)
    meta = AdapterMetadata.from_dict({
        **sections,
        "format_version": FORMAT_VERSION,
        "lexlora_version": __version__,
        "adapter": model.spec.to_dict(),
        **({CLASSIFIER_SECTION: model.classifier.to_dict()} if isinstance(model, LexClassifierModel) else {}),
        "weights": vars(WeightsRecord(
            file=WEIGHTS_NAME, sha256=file_sha256(weights), dtype=save_dtype,
            parameters=int(sum(v.numel() for v in state.values())), bytes=weights.stat().st_size,
        )),
    }, str(directory / META_NAME))
    write_metadata(directory, meta)
    (directory / CARD_NAME).write_text(model_card(meta, directory.name))
    return weights.stat().st_size


def save_adapter(
    model: LexLoraModel,
    output_dir: str | Path,
    metadata: AdapterMetadata | dict[str, Any],
    save_dtype: str = "float16",
    overwrite: bool = False,
) -> Path:
    """Save atomically: temp dir, then rename to `output_dir`."""
    check_output_dir(output_dir, overwrite)
    staging = make_staging_dir(output_dir)
    try:
        write_adapter_files(model, staging, metadata, save_dtype)
        return publish(staging, output_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published


def read_weights(adapter_dir: Path, meta: AdapterMetadata, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights, checked against the sha256 in lexlora.json. A pickle adapter_model.bin (what
    PEFT wrote before safetensors) is refused unless `allow_pickle`; even then it is read with
    torch.load(weights_only=True), which only rebuilds tensors."""
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        if (adapter_dir / PICKLE_NAME).is_file():
            if not allow_pickle:
                raise AdapterError(
                    f"{adapter_dir}: only a pickle {PICKLE_NAME} is present; lexlora loads safetensors only "
                    "(pickle files can run code when loaded). If you trust this file, opt in with "
                    "allow_pickle=True (lexlora generate --allow-pickle), or convert it to safetensors"
                )
            return _read_pickle(adapter_dir / PICKLE_NAME, meta)
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    try:
        data = weights.read_bytes()  # read once: checksummed, then parsed from memory
        _check_sha256(weights, meta, data)
        state = dict(sorted(load_safetensors(data).items()))  # parsed from bytes the order varies: fix it
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    if not state:
        raise AdapterError(f"{weights}: holds no tensors")
    return state


def _check_sha256(path: Path, meta: AdapterMetadata, data: bytes | None = None) -> None:
    recorded = meta.weights
    expected = recorded.sha256
    if recorded.file != path.name:
        logger.warning("%s: %s records the checksum of %s; this file is not verified", path, META_NAME, recorded.file)
        return
    if not expected:
        return
    actual = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(path)
    if actual != expected:
        raise AdapterError(f"{path}: checksum differs from {META_NAME}; the file is corrupted or was replaced")


def _read_pickle(path: Path, meta: AdapterMetadata) -> dict[str, torch.Tensor]:
    logger.warning("%s: loading a pickle weights file (allow_pickle), tensors only (weights_only=True)", path)
    _check_sha256(path, meta)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: any unreadable file
        raise AdapterError(f"{path}: not a readable torch weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{path}: expected a dict of named tensors")
    return state


def spec_from_metadata(meta: AdapterMetadata, source: str) -> AdapterSpec:
    """The adapter spec of lexlora.json, checked: a hand-edited or foreign file fails here, naming
    the key, rather than deep inside generation."""
    where = f"{source}: 'adapter' in {META_NAME}"
    try:
        spec = AdapterSpec(**meta.adapter)
    except TypeError as exc:
        raise AdapterError(f"{where} is not valid ({exc})") from None
    for key in ("input_template", "target_field"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            raise AdapterError(f"{where}: {key} must be a non-empty string, got {getattr(spec, key)!r}")
    for key in ("lexical_field", "fusion_mode", "embedding_model"):
        if getattr(spec, key) is not None and not isinstance(getattr(spec, key), str):
            raise AdapterError(f"{where}: {key} must be a string or null, got {getattr(spec, key)!r}")
    try:
        spec.template
    except ConfigError as exc:
        raise AdapterError(f"{where}: input_template is not usable ({exc})") from None
    if spec.fusion_enabled:
        if spec.fusion_mode not in FUSION_MODES:
            raise AdapterError(f"{where}: fusion_mode must be one of {', '.join(FUSION_MODES)} or null, got {spec.fusion_mode!r}")
        dim = spec.embedding_dim
        if not spec.lexical_field or not spec.embedding_model or not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise AdapterError(
                f"{where}: fusion {spec.fusion_mode!r} needs lexical_field, embedding_model and a positive "
                "embedding_dim"
            )
    return spec


def base_config_from_metadata(meta: AdapterMetadata) -> ModelConfig:
    base = meta.base
    try:
        model_id = base.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must name the base model, got {model_id!r}")
        return ModelConfig(
            name_or_path=model_id,
            random_init=bool(base.get("random_init")),
            init_seed=int(base.get("init_seed") or 0),
            config_overrides=dict(base.get("config_overrides") or {}),
            task=_task(base.get("task")),
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"'base' in {META_NAME} is not valid ({exc})") from None


def _task(value: Any) -> str:
    if value is None:
        return "seq2seq"  # adapters saved before classifiers existed
    if value not in MODEL_TASKS:
        raise ValueError(f"task must be one of {', '.join(MODEL_TASKS)}, got {value!r}")
    return value


def classifier_spec(meta: AdapterMetadata, source: str) -> ClassifierSpec | None:
    """A classifier adapter's labels and pooling (lexlora.json's `classifier`); None for seq2seq."""
    if meta.base.get("task") != "classification":
        return None
    return ClassifierSpec.from_dict(meta.extra.get(CLASSIFIER_SECTION), f"{source}/{META_NAME}")


@dataclass
class AdapterFiles:
    """An adapter dir read and checked, before anything is loaded onto a base."""

    path: Path
    meta: AdapterMetadata
    spec: AdapterSpec
    lora_config: LoraConfig
    state: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> Path:
        """The weights file the state was read from: safetensors, or an opted-in pickle."""
        safetensors = self.path / WEIGHTS_NAME
        return safetensors if safetensors.is_file() else self.path / PICKLE_NAME

    @property
    def weights_bytes(self) -> int:
        return self.weights_path.stat().st_size


def read_adapter_dir(adapter_dir: str | Path, allow_pickle: bool = False) -> AdapterFiles:
    """Read an adapter dir; an AdapterError says what is missing, corrupted or inconsistent."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    spec = spec_from_metadata(meta, str(adapter_dir))
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{adapter_dir}: {CONFIG_NAME} is missing")
    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise AdapterError(f"{config_path}: not a valid PEFT LoRA config ({type(exc).__name__}: {exc})") from None
    state = read_weights(adapter_dir, meta, allow_pickle)
    check_lora_state(state, lora_config, adapter_dir)
    has_fusion = any(k.startswith(FUSION_PREFIX) for k in state)
    if has_fusion != spec.fusion_enabled:
        raise AdapterError(
            f"{adapter_dir}: {META_NAME} says fusion is {'on' if spec.fusion_enabled else 'off'} "
            f"but the weights {'have' if has_fusion else 'lack'} a fusion projection"
        )
    return AdapterFiles(adapter_dir, meta, spec, lora_config, state)



def check_lora_state(state: dict[str, torch.Tensor], config: LoraConfig, adapter_dir: Path) -> None:
    """The LoRA tensors agree with adapter_config.json: every module they touch is a target, every
    listed target has weights, and their rank is `r`. Checked without a base, so both loading paths
    (PEFT's and the registry's) refuse an edited or mixed-up config the same way."""
    source = f"{adapter_dir / WEIGHTS_NAME} vs {CONFIG_NAME}"
    targets = config.target_modules
    rank_free = bool(getattr(config, "rank_pattern", None))
    modules: set[str] = set()
    for key, tensor in state.items():
        if key.startswith(FUSION_PREFIX):
            continue
        path, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            continue  # other PEFT tensors: the loaders say whether they can use them
        module = path.removeprefix(PEFT_PREFIX)
        new = module not in modules  # A and B share a module: matched once
        modules.add(module)
        if new and targets is not None and not targeted(module, targets):
            raise AdapterError(
                f"{source}: the weights hold LoRA for {module}, which target_modules {sorted(targets) if not isinstance(targets, str) else targets!r} "
                "does not select; the config and the weights are from different adapters"
            )
        rank = tensor.shape[0] if kind == "A.weight" else tensor.shape[-1]
        if tensor.dim() != 2 or (not rank_free and rank != config.r):
            raise AdapterError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, i.e. rank {rank}, but r is {config.r}; "
                "the config and the weights are from different adapters"
            )
    if not modules:
        raise AdapterError(f"{source}: the weights hold no LoRA tensors (lora_A / lora_B)")
    if targets is not None and not isinstance(targets, str):
        unused = sorted(t for t in targets if not any(matches_target(m, t) for m in modules))
        if unused:
            raise AdapterError(
                f"{source}: target_modules lists {', '.join(map(repr, unused))} but the weights hold no LoRA for "
                "them; the config and the weights are from different adapters"
            )


def load_adapter(
    adapter_dir: str | Path,
    base=None,
    tokenizer=None,
    base_config: ModelConfig | None = None,
    allow_pickle: bool = False,
) -> LexLoraModel:
    """Load one adapter onto a frozen base (the one named in its metadata unless `base` is given), as
    a PEFT model. For many adapters on one base, see `lexlora.registry.LexLoRA`.

    Refuses, with an AdapterError, a dir that is incomplete or corrupted, or whose base fingerprint
    differs from the loaded base. A pickle adapter_model.bin is read only with `allow_pickle`."""
    files = read_adapter_dir(adapter_dir, allow_pickle)
    base_config = base_config or base_config_from_metadata(files.meta)
    if base is None:
        base = load_base_model(base_config)
    check_fingerprint(files.meta.base, fingerprint(base, base_config), str(files.path))
    if tokenizer is None:
        tokenizer = load_tokenizer(base_config)
    lora_config = files.lora_config
    lora_config.inference_mode = False
    classifier = classifier_spec(files.meta, str(files.path))
    if classifier is not None:
        model = LexClassifierModel.create_classifier(base, tokenizer, lora_config, files.spec, classifier,
                                                     max_source_length=files.meta.max_source_length)
    else:
        model = LexLoraModel.create(base, tokenizer, lora_config, files.spec, generation=files.meta.generation,
                                    max_source_length=files.meta.max_source_length)
        model.labels = tuple(files.meta.labels) if files.meta.labels else None  # generate_text constrains to them
    model.load_trainable_state_dict(files.state, source=str(files.weights_path))
    model.requires_grad_(False)
    model.eval()
    return model
