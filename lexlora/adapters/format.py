"""The adapter dir's format: its file names, PEFT's naming rules, and `lexlora.json` as one typed
`AdapterMetadata` with one reader and one writer. Readable without importing torch or PEFT (so
`lexlora adapters list` answers at once).

Sections that lexlora reads for behaviour are typed (`weights`, `dataset`, `generation`, the source
length of `data`), with their defaults taken from the config's dataclasses; the open-ended ones
(`base` fingerprint, `lora`, `training`, `data`, `metrics`) stay mappings, and keys this version does not
know are kept and written back (a newer lexlora's additions survive a rewrite)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lexlora.config import DataConfig, GenerationSettings
from lexlora.errors import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # what PEFT wrote before safetensors; read only on request
CONFIG_NAME = "adapter_config.json"
META_NAME = "lexlora.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

# ---- PEFT's naming (its saved keys, and how its configs select modules) ---------------------------
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of every saved key (and parameter name)


def matches_target(module_path: str, target: str) -> bool:
    """PEFT's rule for a listed target (target_modules, modules_to_save): the module path is the name
    or ends with `.name`."""
    return module_path == target or module_path.endswith(f".{target}")


def saved_module_matches(module_path: str, target: str) -> bool:
    """PEFT's rule for modules_to_save: a plain suffix match of the module path (no dot boundary)."""
    return module_path.endswith(target)


def targeted(module_path: str, targets: Any) -> bool:
    """Whether PEFT's target_modules select `module_path`: a string is a regex over the whole path
    (or "all-linear"), a list is names matched by `matches_target`."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module_path) is not None
    return any(matches_target(module_path, t) for t in targets)


# ---- lexlora.json --------------------------------------------------------------------------------
@dataclass
class WeightsRecord:
    """What was saved: the weights file, its checksum, dtype and size."""

    file: str = WEIGHTS_NAME
    sha256: str | None = None
    dtype: str | None = None
    parameters: int | None = None
    bytes: int | None = None


@dataclass
class DatasetRecord:
    """The data the adapter was trained on: its path, checksum (None for an HF dataset dir) and splits."""

    path: str | None = None
    sha256: str | None = None
    splits: dict[str, int] = field(default_factory=dict)


@dataclass
class AdapterMetadata:
    """lexlora.json, typed. `adapter` is the AdapterSpec as saved (checked into one by
    `lexlora.adapters.files.spec_from_metadata`); `base` is the fingerprint."""

    base: dict[str, Any]
    adapter: dict[str, Any]
    weights: WeightsRecord = field(default_factory=WeightsRecord)
    format_version: int = FORMAT_VERSION
    lexlora_version: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetRecord = field(default_factory=DatasetRecord)
    training: dict[str, Any] = field(default_factory=dict)
    # How the adapter generates unless a caller says otherwise: the run's generation.* settings.
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    # A label task's label set (sorted, from the train split): generation is constrained to it by
    # default (lexlora.model.label_scoring). None: free text.
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept
    section_extra: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # likewise, in typed sections

    @property
    def max_source_length(self) -> int:
        """The source length the adapter was trained with (data.max_source_length)."""
        value = self.data.get("max_source_length")
        return int(value) if _is_int(value) and value > 0 else DataConfig.max_source_length

    @property
    def scalar_metrics(self) -> dict[str, Any]:
        return {k: v for k, v in self.metrics.items() if not isinstance(v, (dict, list))}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "section_extra") or (f.name == "labels" and self.labels is None):
                continue
            value = getattr(self, f.name)
            out[f.name] = {**self.section_extra.get(f.name, {}), **vars(value)} if f.name in _TYPED else value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = META_NAME) -> "AdapterMetadata":
        """Checked as far as lexlora relies on it, naming the key at fault."""
        version = raw.get("format_version")
        if not _is_int(version):
            raise AdapterError(f"{source}: format_version is missing or not an integer (got {version!r})")
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{source}: adapter format version {version} is newer than this lexlora understands "
                f"({FORMAT_VERSION}); upgrade lexlora"
            )
        for key in ("base", "adapter", "weights"):
            if not isinstance(raw.get(key), dict):
                raise AdapterError(f"{source}: key {key!r} is missing or not an object")
        known = {f.name for f in fields(cls)} - {"extra", "section_extra"}
        values: dict[str, Any] = {"extra": {k: v for k, v in raw.items() if k not in known}, "section_extra": {}}
        for f in fields(cls):
            if f.name not in raw or f.name in ("extra", "section_extra"):
                continue
            value = raw[f.name]
            if f.name in _TYPED:
                values[f.name] = _typed_section(_TYPED[f.name], value, f"{source}: {f.name!r}")
                names = {g.name for g in fields(_TYPED[f.name])}
                unknown = {k: v for k, v in value.items() if k not in names} if isinstance(value, dict) else {}
                if unknown:
                    values["section_extra"][f.name] = unknown
            elif f.name in ("samples",):
                values[f.name] = value if isinstance(value, list) else []
            elif f.name == "labels":
                values[f.name] = _label_list(value, f"{source}: 'labels'")
            elif f.name in ("format_version", "lexlora_version"):
                values[f.name] = value
            else:
                values[f.name] = value if isinstance(value, dict) else {}
        return cls(**values)


_TYPED = {"weights": WeightsRecord, "dataset": DatasetRecord, "generation": GenerationSettings}


def _typed_section(kind: type, value: Any, where: str):
    """A typed section from its JSON object: missing keys take their defaults, unknown keys are
    ignored, and a value of the wrong type is an AdapterError naming it."""
    if not isinstance(value, dict):
        value = {}
    section = kind()
    for f in fields(kind):
        if f.name not in value or value[f.name] is None:
            continue
        got, default = value[f.name], getattr(section, f.name)
        if isinstance(default, int) and not _is_int(got) or isinstance(default, dict) and not isinstance(got, dict):
            raise AdapterError(f"{where}.{f.name} must be {'an integer' if isinstance(default, int) else 'an object'}, got {got!r}")
        setattr(section, f.name, got)
    if kind is GenerationSettings:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            if getattr(section, name) < 1:
                raise AdapterError(f"{where}.{name} must be at least 1, got {getattr(section, name)}")
    return section


def _label_list(value: Any, where: str) -> list[str] | None:
    """A recorded label set: null, or a non-empty list of distinct strings."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise AdapterError(f"{where} must be a non-empty list of strings or null, got {value!r}")
    for index, label in enumerate(value):
        if not isinstance(label, str):
            raise AdapterError(f"{where}[{index}] must be a string, got {label!r}")
    if len(set(value)) != len(value):
        raise AdapterError(f"{where} lists a label twice: {sorted(v for v in set(value) if value.count(v) > 1)}")
    return list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_metadata(adapter_dir: str | Path) -> AdapterMetadata:
    """The adapter dir's lexlora.json, checked; an AdapterError names the file and the fault."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter dir not found: {adapter_dir}")
    path = adapter_dir / META_NAME
    if not path.is_file():
        hint = (
            f" ({CONFIG_NAME} is here: a plain PEFT adapter? lexlora needs the base fingerprint and prompt its "
            f"{META_NAME} records; load it with peft.PeftModel.from_pretrained)"
            if (adapter_dir / CONFIG_NAME).is_file()
            else ""
        )
        raise AdapterError(f"{adapter_dir}: {META_NAME} is missing; not a lexlora adapter dir{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply, an integer too long
        raise AdapterError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return AdapterMetadata.from_dict(meta, str(path))


def write_metadata(directory: str | Path, meta: AdapterMetadata) -> Path:
    """Write lexlora.json (the one writer; unknown keys read earlier are written back)."""
    path = Path(directory) / META_NAME
    path.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n")
    return path
