"""`lexlora export`: one adapter merged into its base and written as a standard transformers model
dir (plus the fusion projection and the adapter's input settings, which lexlora's `load_export`
reads back), verified against the adapter before it is published."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "EXPORT_DTYPES": "layout", "EXPORT_META_NAME": "layout", "FUSION_KEY_PREFIX": "layout",
    "ExportedModel": "exported", "load_export": "exported",
    "ExportReport": "writer", "export_adapter": "writer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
