"""Serving many adapters on one frozen base: the registry (`LexLoRA`), per-row LoRA routing, and the
HTTP API of `lexlora serve`."""

from typing import TYPE_CHECKING

from lexlora._exports import lazy_exports

_EXPORTS = {
    "LexLoRA": "registry", "LoadedAdapter": "registry",
    "LoraRouter": "routing", "LoraWeights": "routing",
    "ServeSettings": "settings", "create_app": "app", "run_server": "server",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from lexlora.serving.registry import LexLoRA, LoadedAdapter
    from lexlora.serving.routing import LoraRouter, LoraWeights
    from lexlora.serving.app import create_app
    from lexlora.serving.server import run_server
    from lexlora.serving.settings import ServeSettings
