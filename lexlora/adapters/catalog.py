"""What each adapter dir is (base, dataset, rank, size, metrics), for `lexlora adapters list/show`.

Reads lexlora.json and adapter_config.json only; never loads a model. Adapters saved by other code
paths may lack the lora/dataset/training/metrics keys (only base, adapter and weights are required),
so every optional value is None here and "-" in the text output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lexlora.adapters.format import CONFIG_NAME, META_NAME, WEIGHTS_NAME, read_metadata
from lexlora.errors import AdapterError
from lexlora.fileio import file_sha256

MISSING = "-"


def find_adapters(root: str | Path) -> list[Path]:
    """The adapter dirs directly under `root` (those with a lexlora.json), by name; `root` itself if
    it is one. Hidden dirs are skipped: they are save_adapter's staging and backup dirs."""
    root = Path(root)
    if not root.exists():
        raise AdapterError(f"adapters dir not found: {root}")
    if not root.is_dir():
        raise AdapterError(f"{root} is not a directory")
    if (root / META_NAME).is_file():
        return [root]
    return sorted(
        (p for p in root.iterdir() if not p.name.startswith(".") and (p / META_NAME).is_file()),
        key=lambda p: p.name,
    )


def describe_adapter(adapter_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """A flat summary of one adapter dir; AdapterError if its lexlora.json is missing or invalid.
    With `verify`, also hashes the weights file against the recorded sha256 ("checksum")."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    base, spec, weights, dataset, metrics = meta.base, meta.adapter, meta.weights, meta.dataset, meta.metrics
    # adapter_config.json is what PEFT actually loads, and it holds the resolved target modules where
    # lexlora.json may say null ("the architecture's default"); lexlora.json is the fallback.
    peft = _read_json_object(adapter_dir / CONFIG_NAME)
    weights_path = adapter_dir / WEIGHTS_NAME  # the file load_adapter reads, whatever "file" says
    size = weights.bytes
    if size is None and weights_path.is_file():
        size = weights_path.stat().st_size
    val_loss = metrics.get("final_val_loss")
    if not _is_number(val_loss):
        val_loss = metrics.get("best_val_loss")
    info = {
        "name": adapter_dir.resolve().name,
        "path": str(adapter_dir),
        "base": base.get("model_id"),
        "base_type": base.get("model_type"),
        "random_init": bool(base.get("random_init")),
        "init_seed": base.get("init_seed"),
        "dataset": dataset.path,
        "dataset_sha256": dataset.sha256,
        "splits": dataset.splits or None,
        "rank": peft.get("r", meta.lora.get("r")),
        "alpha": peft.get("lora_alpha", meta.lora.get("alpha")),
        "dropout": peft.get("lora_dropout", meta.lora.get("dropout")),
        "target_modules": peft.get("target_modules") or meta.lora.get("target_modules"),
        "use_dora": peft.get("use_dora", meta.lora.get("use_dora")),
        "use_rslora": peft.get("use_rslora", meta.lora.get("use_rslora")),
        "input_template": spec.get("input_template"),
        "target_field": spec.get("target_field"),
        "lexical_field": spec.get("lexical_field"),
        "fusion_mode": spec.get("fusion_mode"),
        "embedding_model": spec.get("embedding_model"),
        "embedding_dim": spec.get("embedding_dim"),
        "weights_bytes": size,
        "weights_dtype": weights.dtype,
        "parameters": weights.parameters,
        "weights_sha256": weights.sha256,
        "val_loss": val_loss if _is_number(val_loss) else None,
        "steps": metrics.get("steps"),
        "metrics": _scalars(metrics),
        "training": _scalars(meta.training),
        "generation": _scalars(vars(meta.generation)),
        "lexlora_version": meta.lexlora_version,
        "format_version": meta.format_version,
    }
    if verify:
        info["checksum"] = _checksum_status(weights_path, weights.sha256)
    return info


def list_adapters(root: str | Path) -> list[dict[str, Any]]:
    """describe_adapter for each adapter under `root`; a broken one becomes {name, path, error} so
    that one bad dir does not hide the others."""
    rows = []
    for path in find_adapters(root):
        try:
            rows.append(describe_adapter(path))
        except (AdapterError, OSError) as exc:  # OSError: an unreadable lexlora.json
            rows.append({"name": path.resolve().name, "path": str(path), "error": str(exc)})
    return rows


LIST_COLUMNS = ("NAME", "BASE", "DATASET", "RANK", "FUSION", "SIZE", "VAL LOSS")


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per adapter under a header, columns padded to their widest cell."""
    cells = [list(LIST_COLUMNS)]
    for row in rows:
        if "error" in row:
            cells.append([row["name"], f"error: {row['error']}"])
            continue
        cells.append([
            row["name"],
            base_label(row),
            _text(row["dataset"]),
            _text(row["rank"]),
            row["fusion_mode"] or "off",
            human_size(row["weights_bytes"]),
            _loss(row["val_loss"]),
        ])
    widths = [max(len(line[i]) for line in cells if i < len(line) - 1) for i in range(len(LIST_COLUMNS) - 1)]
    # An error row's message runs on past the columns rather than widening them all.
    return "\n".join(
        "  ".join([cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])] + [line[-1]]).rstrip()
        for line in cells
    )


def format_details(info: dict[str, Any]) -> str:
    """`key  value` lines for one adapter; training/generation/metrics entries as dotted keys so
    each line can be grepped on its own."""
    splits = info["splits"]
    targets = info["target_modules"]
    fusion = info["fusion_mode"] or "off"
    if info["fusion_mode"]:
        fusion += f" ({_text(info['embedding_model'])}, {_text(info['embedding_dim'])} dims)"
    pairs = [
        ("name", info["name"]),
        ("path", info["path"]),
        ("base", base_label(info)),
        ("base type", info["base_type"]),
        ("dataset", info["dataset"]),
        ("dataset sha256", info["dataset_sha256"]),
        ("splits", ", ".join(f"{k} {v}" for k, v in splits.items()) if splits else None),
        ("rank", info["rank"]),
        ("alpha", info["alpha"]),
        ("dropout", info["dropout"]),
        ("target modules", ", ".join(map(str, targets)) if isinstance(targets, list) else targets),
        ("dora", info["use_dora"]),
        ("rslora", info["use_rslora"]),
        ("prompt template", info["input_template"]),
        ("target field", info["target_field"]),
        ("lexical field", info["lexical_field"]),
        ("fusion", fusion),
        ("size", _size_detail(info["weights_bytes"])),
        ("dtype", info["weights_dtype"]),
        ("parameters", f"{info['parameters']:,}" if _is_number(info["parameters"]) else info["parameters"]),
        ("weights sha256", info["weights_sha256"]),
        ("checksum", info.get("checksum")),
        ("val loss", _loss(info["val_loss"])),
        ("steps", info["steps"]),
        ("lexlora version", info["lexlora_version"]),
        ("format version", info["format_version"]),
    ]
    for section in ("training", "generation", "metrics"):
        pairs += [(f"{section}.{key}", value) for key, value in info[section].items()]
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {_text(value)}" for key, value in pairs)


def base_label(info: dict[str, Any]) -> str:
    label = _text(info["base"])
    if info["random_init"]:
        label += f" (random init, seed {_text(info['init_seed'])})"
    return label


def human_size(size: Any) -> str:
    return f"{size / 1e6:.2f} MB" if _is_number(size) else MISSING  # MB as in the model card


def _size_detail(size: Any) -> str:
    return f"{human_size(size)} ({size:,} bytes)" if _is_number(size) else MISSING


def _checksum_status(path: Path, expected: Any) -> str:
    if not path.is_file():
        return "MISSING FILE"
    if not expected:
        return "not recorded"
    return "ok" if file_sha256(path) == expected else "MISMATCH"



def _scalars(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if not isinstance(v, (dict, list))}


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent or unreadable: listing should still work."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loss(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else MISSING


def _text(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("\n", "\\n")  # a multi-line prompt template stays on its line
