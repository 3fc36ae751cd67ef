"""The export dir's own files beside transformers' (config.json, model.safetensors, tokenizer,
generation_config.json): `lexlora_export.json` (what the model expects of its inputs, how it was
verified) and the fusion projection, stored inside model.safetensors under keys no transformers
model has, so that plain transformers reports them as UNEXPECTED when it loads the dir: that
report is the warning that the fusion input is not applied."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lexlora.errors import AdapterError

EXPORT_META_NAME = "lexlora_export.json"
MODEL_WEIGHTS_NAME = "model.safetensors"  # transformers' single-file weights name
EXPORT_FORMAT_VERSION = 1
EXPORT_DTYPES = ("float32", "float16", "bfloat16")  # --dtype; a subset of the adapters' DTYPES
# The key names are the message transformers shows in its load report (UNEXPECTED keys).
FUSION_KEY_PREFIX = "lexlora_fusion_NOT_APPLIED_by_transformers__load_with_lexlora.export.load_export."


@dataclass
class Verification:
    """How the export was checked against the adapter (in float32, before any cast)."""

    rows: int
    source: str  # where the rows came from: the adapter's validation split, given inputs, defaults
    max_abs_logit_diff: float
    differing_outputs: int
    tolerance: float


@dataclass
class ExportMetadata:
    """lexlora_export.json."""

    adapter: dict[str, Any]  # the AdapterSpec
    source_adapter: str
    base: dict[str, Any]  # the adapter's base fingerprint
    dtype: str
    generation: dict[str, Any]
    max_source_length: int
    verification: dict[str, Any] = field(default_factory=dict)  # filled in once the check has run
    lexlora_version: str | None = None
    format_version: int = EXPORT_FORMAT_VERSION
    fusion_keys: list[str] = field(default_factory=list)

    def write(self, directory: Path) -> Path:
        path = directory / EXPORT_META_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> ExportMetadata:
        path = directory / EXPORT_META_NAME
        if not directory.is_dir():
            raise AdapterError(f"export dir not found: {directory}")
        if not path.is_file():
            raise AdapterError(f"{directory}: {EXPORT_META_NAME} is missing; not a lexlora export dir "
                               "(a plain transformers dir loads with AutoModelForSeq2SeqLM.from_pretrained)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AdapterError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise AdapterError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
            raise AdapterError(f"{path}: format_version {version!r} is not one this lexlora reads "
                               f"(up to {EXPORT_FORMAT_VERSION}); upgrade lexlora")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise AdapterError(f"{path}: {exc}") from None


def export_card(meta: ExportMetadata, name: str) -> str:
    """README.md: what the dir is, how it was verified, and how to load it (with fusion: why plain
    transformers is not enough)."""
    spec, check = meta.adapter, meta.verification
    fusion = spec.get("fusion_mode")
    lines = [
        "---", "library_name: transformers", "tags: [lexlora, lora-merged]", "---", "",
        f"# {name}", "",
        (f"The lexlora adapter `{meta.source_adapter}` merged into its base `{meta.base.get('model_id')}` "
        "(LoRA folded into the weights, modules trained in full included): a standard transformers "
        f"seq2seq model. Weights saved in **{meta.dtype}**."), "",
        (f"Verified before it was written, in float32 on {check['rows']} rows ({check['source']}): greedy "
        f"outputs differing from the adapter's: {check['differing_outputs']}; largest logit difference "
        f"{check['max_abs_logit_diff']:.2e} (limit {check['tolerance']:.0e})."), "",
        f"Prompt template: `{spec.get('input_template')}`.", "",
    ]
    if fusion:
        lines += [
            "## Fusion input: load with lexlora", "",
            (f"This model was trained with a **fusion projection** ({fusion} mode): the "
            f"`{spec.get('embedding_model')}` embedding of the `{spec.get('lexical_field')}` field is projected "
            "and injected into the encoder input. **Plain transformers ignores it** "
            "(`AutoModelForSeq2SeqLM.from_pretrained` loads the merged weights and reports the projection's "
            f"keys, `{FUSION_KEY_PREFIX}*`, as UNEXPECTED), so its outputs are not the adapter's. Load it with:"), "",
            "```python", "from lexlora.export import load_export", "",
            "model = load_export(\"PATH\")", "model.generate_text([\"backup_config.json\"])", "```", "",
        ]
    else:
        lines += [
            "## Use", "", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "",
            "model = AutoModelForSeq2SeqLM.from_pretrained(\"PATH\")",
            "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", "",
            ("Inputs must be formatted with the prompt template above (or use `lexlora.export.load_export`, "
            "which does it)."), "",
        ]
    return "\n".join(lines)
