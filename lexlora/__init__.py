"""lexlora: LoRA adapters with a lexical fusion projection for seq2seq models."""

__version__ = "0.1.0"

from lexlora.errors import AdapterError, ConfigError, DataError, LexloraError, ModelLoadError

__all__ = [
    "__version__",
    "AdapterError",
    "ConfigError",
    "DataError",
    "LexloraError",
    "ModelLoadError",
]
