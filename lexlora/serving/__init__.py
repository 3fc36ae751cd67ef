"""Serving many adapters on one frozen base: the registry (`LexLoRA`), per-row LoRA routing, and the
HTTP API of `lexlora serve`."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "LexLoRA": "registry", "LoadedAdapter": "registry",
    "LoraRouter": "routing", "LoraWeights": "routing",
    "ServeSettings": "settings", "create_app": "app", "run_server": "server",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

