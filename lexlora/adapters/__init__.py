"""The adapter dir: its format (typed lexlora.json), the base fingerprint, save / load / verify, the
model card, and the catalog behind `lexlora adapters list|show`."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "CARD_NAME": "format", "CONFIG_NAME": "format", "FORMAT_VERSION": "format", "META_NAME": "format", "WEIGHTS_NAME": "format", "read_metadata": "format",
    "AdapterMetadata": "format", "write_metadata": "format",
    "check_fingerprint": "fingerprint", "fingerprint": "fingerprint",
    "AdapterFiles": "files", "check_output_dir": "files", "load_adapter": "files", "read_adapter_dir": "files", "save_adapter": "files", "write_adapter_files": "files",
    "model_card": "card",
    "describe_adapter": "catalog", "find_adapters": "catalog", "list_adapters": "catalog",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

