"""lexlora: LoRA adapters with a lexical fusion projection for seq2seq models."""

from lexlora.errors import (
    AdapterError,
    ConfigError,
    DataError,
    LexloraError,
    ModelLoadError,
)
from lexlora.version import __version__

__all__ = [
    "__version__",
    "AdapterError",
    "ConfigError",
    "DataError",
    "LexLoRA",
    "LexloraError",
    "ModelLoadError",
]


def __getattr__(name: str):
    # Imported on first use: it pulls in torch and transformers, which `lexlora adapters list` avoids.
    if name == "LexLoRA":
        from lexlora.serving.registry import LexLoRA

        return LexLoRA
    raise AttributeError(f"module 'lexlora' has no attribute {name!r}")
