"""Hugging Face `evaluate` metric scripts that ship inside lexlora, so that scoring works offline.

Each `<name>.py` here is an `evaluate` module script: load it by path, as `lexlora.metrics` does
(`evaluate.load(str(METRIC_DIR / "rouge.py"))`). `evaluate` copies the script into its own modules
cache and imports that copy; nothing here is meant to be imported directly.
"""

from pathlib import Path

METRIC_DIR = Path(__file__).resolve().parent
