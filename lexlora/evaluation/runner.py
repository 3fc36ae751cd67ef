"""`lexlora eval`: generate for a split with the adapter and with the base alone (same rows, same
prompts), score both against the references, and write the report.

The rows come from the adapter's own data settings (its config.yaml, or lexlora.json) unless
another data file is given, by default from its test split, else validation (`default_split`); the
task (free text → ROUGE, a small label set → accuracy / F1) is detected from the references unless
set."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lexlora.adapters.format import META_NAME, AdapterMetadata, read_metadata
from lexlora.config import TASKS, DataConfig, ModelConfig
from lexlora.data.splits import load_splits
from lexlora.errors import ConfigError, DataError
from lexlora.evaluation.metrics import detect_task, score
from lexlora.evaluation.results import (
    DATA_CHANGED,
    DATA_OTHER,
    DATA_SAME,
    DATA_UNCHECKED,
    DataCheck,
    EvalResult,
    EvalRows,
)
from lexlora.fileio import file_sha256

logger = logging.getLogger(__name__)


def data_config_for(adapter_dir: Path, meta: AdapterMetadata) -> DataConfig:
    """The data settings the adapter was trained with (lexlora.json keeps all but the path)."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    config = DataConfig(**{k: v for k, v in meta.data.items() if k in known})
    config.path = meta.dataset.path or ""
    adapter = meta.adapter
    config.input_template = adapter["input_template"]
    config.target_field = adapter["target_field"]
    config.lexical_field = adapter.get("lexical_field") or config.lexical_field
    return config


def default_split(adapter_dir: str | Path) -> str:
    """The split scored when none is named: test where the adapter's data.splits has one (rows no
    training choice saw), else validation (e.g. configs/smoke.yaml has only train/validation)."""
    adapter_dir = Path(adapter_dir)
    return _default_of(data_config_for(adapter_dir, read_metadata(adapter_dir)).splits)


def _default_of(splits: Mapping[str, str]) -> str:
    return "test" if "test" in splits else "validation"


def eval_rows(
    adapter_dir: str | Path,
    split: str | None = None,
    data_path: str | None = None,
    max_rows: int | None = None,
    allow_data_change: bool = False,
) -> EvalRows:
    """The split's records (as the adapter's template needs them) and references.

    `split` names one of the adapter's data.splits, or "all" for every row of the file (None:
    `default_split`). The training file changed since training is a DataError unless
    `allow_data_change` (see check_data)."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    data = data_config_for(adapter_dir, meta)
    if data_path:
        data.path = str(data_path)
    if not data.path or not Path(data.path).exists():
        raise DataError(
            f"data file {data.path or '(none recorded)'} not found (recorded in {adapter_dir}/lexlora.json "
            "relative to where training ran); pass --data FILE"
        )
    data_check = check_data(adapter_dir, meta, data.path, allow_data_change)
    split = split or _default_of(data.splits)
    if split == "all":
        data.splits = {"all": "[:100%]"}
    elif split not in data.splits:
        raise ConfigError(
            f"split {split!r} is not one of this adapter's splits {sorted(data.splits)} "
            "(or use --split all for the whole file)"
        )
    splits, _, _ = load_splits(data, fusion_enabled=bool(meta.adapter.get("fusion_mode")))
    records = splits[split][:max_rows] if max_rows else splits[split]
    if not records:
        raise DataError(f"{data.path}: split {split!r} ({data.splits[split]}) has no rows")
    return EvalRows(
        records=[dict(r.fields) for r in records],
        references=[r.fields[data.target_field] for r in records],
        lines=[r.line for r in records],
        data_path=data.path,
        split=split,
        data_check=data_check,
    )


def check_data(adapter_dir: Path, meta: AdapterMetadata, data_path: str, allow_change: bool = False) -> DataCheck:
    """Compare the file to score with the dataset hash recorded at training (lexlora.json dataset.sha256).

    The recorded file with other bytes is a DataError (its splits are no longer the rows trained and
    tested on) unless `allow_change`. Another file given with --data is the user's choice: it is
    scored, and the report says it is not the training data. Without a recorded hash (old adapters,
    saved dataset dirs) nothing is checked."""
    trained_path, trained_sha256 = meta.dataset.path, meta.dataset.sha256
    sha256 = file_sha256(Path(data_path)) if Path(data_path).is_file() else None
    if not trained_sha256 or sha256 is None:
        status = DATA_UNCHECKED
    elif sha256 == trained_sha256:
        status = DATA_SAME
    elif not _same_file(data_path, trained_path):
        status = DATA_OTHER
    elif allow_change:
        status = DATA_CHANGED
    else:
        raise DataError(
            f"{data_path} has changed since {adapter_dir} was trained on it: sha256 {sha256[:12]} now, "
            f"{trained_sha256[:12]} recorded in {adapter_dir}/{META_NAME}; its splits may no longer be the rows "
            "the adapter was trained and tested on. Pass --allow-data-change to score it anyway"
        )
    check = DataCheck(status, sha256, trained_path, trained_sha256)
    if status in (DATA_CHANGED, DATA_OTHER):
        logger.warning("%s", check.note(data_path))
    return check


def _same_file(path: str, trained_path: str | None) -> bool:
    """Whether `path` is the recorded training file (which is relative to where training ran)."""
    try:
        return bool(trained_path) and os.path.samefile(path, trained_path)
    except OSError:  # the recorded path is not found from here
        return False


def evaluate_adapter(
    registry,
    name: str,
    rows: EvalRows,
    task: str = "auto",
    with_base: bool = True,
    bleu: bool = False,
    **generate_kwargs: Any,
) -> EvalResult:
    """Generate with the adapter `name` of a LexLoRA registry (and with its base alone on the same
    prompts), then score both."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    task = detect_task(rows.references) if task == "auto" else task
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    adapter_out = registry.generate(rows.records, adapter=name, **generate_kwargs)
    seconds["adapter_generate"] = round(time.perf_counter() - started, 3)
    base_out = None
    # A classifier's base alone has no head (nothing to compare with): its report shows the adapter only.
    if with_base and not is_classifier(registry.adapters[name].metadata):
        started = time.perf_counter()
        with registry.disable_adapters():
            base_out = registry.generate(rows.records, adapter=name, **generate_kwargs)
        seconds["base_generate"] = round(time.perf_counter() - started, 3)
    spec = registry.adapters[name].spec
    shown = spec.lexical_field or spec.input_fields[0]
    return EvalResult(
        adapter=name,
        split=rows.split,
        data_path=rows.data_path,
        task=task,
        count=len(rows.references),
        adapter_scores=score(task, adapter_out, rows.references, bleu=bleu),
        base_scores=score(task, base_out, rows.references, bleu=bleu) if base_out is not None else None,
        rows=[
            {"line": line, "input": record[shown] if len(spec.input_fields) == 1 else record,
             "reference": ref, "base": base_out[i] if base_out else None, "adapter": out}
            for i, (line, record, ref, out) in enumerate(zip(rows.lines, rows.records, rows.references, adapter_out))
        ],
        seconds=seconds,
        data_check=rows.data_check,
    )


def run_evaluation(
    adapter_dir: str | Path,
    split: str | None = None,
    data_path: str | None = None,
    out_dir: str | Path | None = None,
    task: str = "auto",
    max_rows: int | None = None,
    with_base: bool = True,
    bleu: bool = False,
    base: str | None = None,
    device: str | None = None,
    samples: int = 5,
    allow_data_change: bool = False,
    **generate_kwargs: Any,
) -> tuple[EvalResult, Path]:
    """The whole `lexlora eval`: rows, registry on the adapter's base, generation, scores, report
    (default: `<adapter>/eval/<split>`; split None: `default_split`). `allow_data_change`: score the
    training file even though it changed since training (the report says so)."""
    # Imported here, not at the top: both import torch, which bad input should not wait for.
    from lexlora.evaluation.reports import write_eval_report
    from lexlora.serving.registry import LexLoRA

    adapter_dir = Path(adapter_dir)
    rows = eval_rows(adapter_dir, split, data_path, max_rows, allow_data_change)  # fails fast, before any model loads
    if task == "auto":
        task = _recorded_task(read_metadata(adapter_dir))
    if base:
        from lexlora.adapters.files import base_config_from_metadata

        config = base_config_from_metadata(read_metadata(adapter_dir))  # its task (a classifier: the encoder)
        config = ModelConfig(name_or_path=base, task=config.task)
        registry = LexLoRA.from_config(config, device=device)
    else:
        registry = LexLoRA.for_adapter(adapter_dir, device=device)
    name = adapter_dir.resolve().name
    registry.load_adapter(adapter_dir, name=name)
    result = evaluate_adapter(registry, name, rows, task=task, with_base=with_base, bleu=bleu, **generate_kwargs)
    out = write_eval_report(result, Path(out_dir) if out_dir else adapter_dir / "eval" / rows.split, samples)
    return result, out


def is_classifier(meta: AdapterMetadata) -> bool:
    return meta.base.get("task") == "classification"


def _recorded_task(meta: AdapterMetadata) -> str:
    """The task the adapter was trained for, when its config set one (data.task); a classifier's is labels."""
    if is_classifier(meta):
        return "labels"
    task = meta.data.get("task") or "auto"
    return task if task in TASKS else "auto"
