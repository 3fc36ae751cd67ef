"""The adapter dir's file names and its lexlora.json, readable without importing torch or PEFT
(so `lexlora adapters list` answers at once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lexlora.errors import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
META_NAME = "lexlora.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
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
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{path}: format_version is missing or not an integer (got {version!r})")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{path}: adapter format version {version} is newer than this lexlora understands "
            f"({FORMAT_VERSION}); upgrade lexlora"
        )
    for key in ("base", "adapter", "weights"):
        if not isinstance(meta.get(key), dict):
            raise AdapterError(f"{path}: key {key!r} is missing or not an object")
    return meta
