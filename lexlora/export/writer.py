"""`lexlora export`: merge one adapter's LoRA (and any modules trained in full) into its base with
PEFT's `merge_and_unload`, write a standard transformers dir into a staging dir, load that dir back
and check it against the adapter (greedy outputs equal, logits within 1e-4 in float32), cast to the
requested dtype, and only then rename it into place. Any difference refuses the export with the
figures; nothing is left under the final name."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from lexlora.adapters.files import (
    DTYPES,
    base_config_from_metadata,
    check_output_dir,
    load_adapter,
    publish,
    require_finite,
)
from lexlora.adapters.format import META_NAME, AdapterMetadata, read_metadata
from lexlora.errors import AdapterError, ConfigError, DataError, ModelLoadError
from lexlora.export.exported import ExportedModel, open_export
from lexlora.export.layout import (
    EXPORT_DTYPES,
    FUSION_KEY_PREFIX,
    MODEL_WEIGHTS_NAME,
    ExportMetadata,
    Verification,
    export_card,
)
from lexlora.fileio import current_umask, make_staging_dir, os_reason
from lexlora.model.generation import RowPlan, generate_from_embeds
from lexlora.model.loading import is_quantized
from lexlora.model.lora_model import LexLoraModel
from lexlora.version import __version__

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest logit difference (float32) an export may show against its adapter
# Checked when the adapter's data is absent and no inputs are given (single-field adapters only).
DEFAULT_INPUTS = ("backup_config.json", "utils/strings.py", "README.md", "extract_window_events",
                  "test_parser.cpp", "Makefile", "docs/index.html", "scripts/train_lora.py")


@dataclass
class ExportReport:
    path: Path
    dtype: str
    fusion: bool
    verification: Verification


def export_adapter(adapter_dir: str | Path, out: str | Path, *, dtype: str = "float32",
                   inputs: Sequence[str | Mapping[str, str]] | None = None, max_rows: int = 32,
                   overwrite: bool = False) -> ExportReport:
    """Export `adapter_dir` to `out` (see the module docstring); refused with a lexlora error for a
    quantized base, an existing `out` (unless `overwrite`), a base that cannot be loaded, or an
    export that does not reproduce the adapter."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    meta = read_metadata(adapter_dir)
    if meta.base.get("task") == "classification":
        raise AdapterError(f"{adapter_dir}: a classifier-head adapter; lexlora export writes merged seq2seq models "
                           "only (serve or load classifier adapters with lexlora / LexLoRA)")
    _refuse_quantized(adapter_dir, recorded_quantization(adapter_dir, meta))
    if out.exists() and not overwrite:
        raise AdapterError(f"output dir {out} already exists; choose another --out, or pass --overwrite to "
                           "replace it once the new export is verified")
    check_output_dir(out, overwrite=True)  # writable, not a file
    model = _load(adapter_dir, meta)
    if is_quantized(model.base_model):
        _refuse_quantized(adapter_dir, "8bit/4bit (as loaded)")
    model.float()  # verified in float32 whatever the base was loaded in; cast afterwards
    rows, source = verification_rows(adapter_dir, model, inputs, max_rows)
    checker = Checker(model, rows, meta.generation.max_new_tokens)
    reference = checker.run(model)
    merged = merge_adapter(model)
    staging = make_staging_dir(out)
    try:
        exported = ExportedModel(merged, model.tokenizer, model.spec, model.lexical_fusion,
                                 meta.generation.max_new_tokens, meta.generation.num_beams, meta.max_source_length)
        export_meta = ExportMetadata(
            adapter=model.spec.to_dict(), source_adapter=str(adapter_dir), base=meta.base, dtype=dtype,
            generation=asdict(meta.generation), max_source_length=meta.max_source_length,
            lexlora_version=__version__, fusion_keys=_write_model(exported, staging, "float32"),
        )
        # The dir as written and read back, not the model in memory, is what is checked.
        verification = checker.compare(reference, open_export(staging, export_meta, torch.float32), source)
        if verification.differing_outputs or not verification.max_abs_logit_diff <= TOLERANCE:
            raise AdapterError(
                f"{adapter_dir}: the merged model does not reproduce the adapter, so nothing was exported to {out}: "
                f"{verification.differing_outputs} of {verification.rows} greedy outputs differ, max abs logit "
                f"difference {verification.max_abs_logit_diff:.3g} (limit {TOLERANCE:g}; rows: {source})"
            )
        if dtype != "float32":
            _write_model(exported, staging, dtype)
        export_meta.verification = asdict(verification)
        export_meta.write(staging)
        (staging / "README.md").write_text(export_card(export_meta, out.name))
        publish(staging, out, overwrite)
    except OSError as exc:
        raise AdapterError(f"cannot write the export into {staging} ({os_reason(exc)}); nothing was published") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    logger.info("exported %s to %s (%s; %s)", adapter_dir, out, dtype, source)
    return ExportReport(out, dtype, model.spec.fusion_enabled, verification)


def recorded_quantization(adapter_dir: Path, meta: AdapterMetadata) -> str:
    """model.quantization as the adapter records it (its base, its run's metrics, its config.yaml)."""
    found = [meta.base.get("quantization"), meta.metrics.get("quantization")]
    config = adapter_dir / "config.yaml"
    if config.is_file():
        try:
            resolved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            found.append((resolved.get("model") or {}).get("quantization"))
        except (yaml.YAMLError, OSError, AttributeError, UnicodeDecodeError):
            pass  # lexlora.json is the adapter's record; config.yaml is a copy for people
    return next((str(q) for q in found if q not in (None, "none")), "none")


def _refuse_quantized(adapter_dir: Path, quantization: str) -> None:
    if quantization != "none":
        raise AdapterError(
            f"{adapter_dir}: its base is quantized ({quantization}); lexlora export merges LoRA into full-precision "
            "weights only (merging into k-bit weights rounds the adapter away). Serve it with lexlora instead"
        )


def _load(adapter_dir: Path, meta: AdapterMetadata) -> LexLoraModel:
    base_config = base_config_from_metadata(meta)
    # transformers' own ops, as the exported dir will run under plain transformers (fast_ops only
    # round differently, but the check compares to 1e-4).
    base_config.fast_ops = False
    try:
        return load_adapter(adapter_dir, base_config=base_config)
    except ModelLoadError as exc:
        raise AdapterError(
            f"{adapter_dir}: cannot export: its base {meta.base.get('model_id')!r} (recorded in {META_NAME}) "
            f"cannot be loaded: {exc}"
        ) from None


def merge_adapter(model: LexLoraModel) -> PreTrainedModel:
    """The base with the LoRA deltas added into its weights and each module trained in full
    (modules_to_save, e.g. a warm start's cross-attention) put in place of its original."""
    return model.peft_model.merge_and_unload()


def verification_rows(adapter_dir: Path, model: LexLoraModel, inputs, max_rows: int) -> tuple[list[dict[str, str]], str]:
    """Given inputs, else the adapter's validation rows from its recorded data, else DEFAULT_INPUTS."""
    spec = model.spec
    if inputs:
        return spec.format_inputs(list(inputs)), f"{len(inputs)} given inputs"
    from lexlora.evaluation.runner import (
        eval_rows,  # the data reader; only when rows are taken from it
    )

    try:
        rows = eval_rows(adapter_dir, split="validation", max_rows=max_rows)
        return spec.format_inputs(rows.records), f"validation split of {rows.data_path}"
    except (DataError, ConfigError) as exc:
        logger.warning("export check: the adapter's validation rows are not available (%s); checking on "
                       "lexlora's default inputs (--inputs to choose them)", exc)
    if len(spec.input_fields) != 1:
        raise DataError(f"{adapter_dir}: its validation data is not available and it takes the fields "
                        f"{spec.input_fields}; give rows to check the export with (--inputs JSON records)")
    return spec.format_inputs(list(DEFAULT_INPUTS)), "lexlora's default inputs (no validation rows available)"


class Checker:
    """The same rows, tokens and lexical vectors for the adapter and its export: greedy token ids, and
    the logits of the adapter's greedy outputs under teacher forcing."""

    def __init__(self, model: LexLoraModel, rows: list[dict[str, str]], max_new_tokens: int, batch_size: int = 16):
        self.pipeline = model.pipeline  # the adapter's own: its tokenizer and lexical encoder
        plan = RowPlan(spec=model.spec, max_source_length=model.max_source_length, max_new_tokens=max_new_tokens,
                       num_beams=1)
        self.plans, self.rows, self.batch_size = [plan] * len(rows), rows, batch_size
        self.lexical = self.pipeline.lexical(model, self.plans, rows)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def run(self, backend: Any, reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Per batch: (greedy ids, logits); the logits are of `reference`'s ids when given."""
        results = []
        for n, start in enumerate(range(0, len(self.rows), self.batch_size)):
            chunk = slice(start, start + self.batch_size)
            embeds, mask = self.pipeline.encoder_inputs(backend, self.plans[chunk], self.rows[chunk], self.lexical[chunk])
            ids = generate_from_embeds(backend.seq2seq, embeds, mask, max_new_tokens=self.max_new_tokens,
                                       num_beams=1, do_sample=False)
            forced = reference[n][0] if reference else ids
            logits = backend.seq2seq(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=forced).logits
            results.append((ids, logits.float()))
        return results

    def compare(self, reference, backend: Any, source: str) -> Verification:
        differing, diff = 0, 0.0
        for (ref_ids, ref_logits), (ids, logits) in zip(reference, self.run(backend, reference)):
            width = max(ref_ids.shape[1], ids.shape[1])
            pad = self.pipeline.tokenizer.pad_token_id or 0
            a = torch.nn.functional.pad(ref_ids, (0, width - ref_ids.shape[1]), value=pad)
            b = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad)
            differing += int((a != b).any(dim=1).sum())
            delta = (ref_logits - logits).abs().max().item()
            diff = delta if math.isnan(delta) or math.isnan(diff) else max(diff, delta)  # NaN fails the check
        return Verification(rows=len(self.rows), source=source, max_abs_logit_diff=diff,
                            differing_outputs=differing, tolerance=TOLERANCE)


def _write_model(exported: ExportedModel, directory: Path, dtype: str) -> list[str]:
    """config, model.safetensors (with the fusion projection under FUSION_KEY_PREFIX), tokenizer and
    generation config in `dtype`; returns the fusion keys."""
    torch_dtype = DTYPES[dtype]
    model = exported.seq2seq.to(torch_dtype)
    model.generation_config.max_new_tokens = exported.max_new_tokens  # the adapter's own defaults
    model.generation_config.num_beams = exported.num_beams
    model.save_pretrained(str(directory), max_shard_size="1000GB")  # one file: the fusion keys go in it
    exported.tokenizer.save_pretrained(str(directory))
    weights = directory / MODEL_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"transformers did not write {weights}; cannot add the fusion projection")
    with safe_open(str(weights), "pt") as handle:
        file_meta = handle.metadata() or {"format": "pt"}
    state = load_file(str(weights))
    if exported.fusion is not None:
        for key, value in exported.fusion.state_dict().items():
            state[FUSION_KEY_PREFIX + key] = value.detach().to("cpu", torch_dtype).contiguous()
    require_finite(state, dtype, "nothing was exported", "--dtype bfloat16 or float32 keep a wider range")
    save_file(state, str(weights), metadata=file_meta)
    weights.chmod(0o666 & ~current_umask())  # safetensors writes 0600; an export gets the usual permissions
    return sorted(k for k in state if k.startswith(FUSION_KEY_PREFIX))
