"""The adapter dir: its format (typed lexlora.json), the base fingerprint, save / load / verify, the
model card, and the catalog behind `lexlora adapters list|show`."""

from typing import TYPE_CHECKING

from lexlora._exports import lazy_exports

_EXPORTS = {
    "CARD_NAME": "format", "CONFIG_NAME": "format", "FORMAT_VERSION": "format", "META_NAME": "format", "WEIGHTS_NAME": "format", "read_metadata": "format",
    "check_fingerprint": "fingerprint", "fingerprint": "fingerprint",
    "AdapterFiles": "files", "check_output_dir": "files", "load_adapter": "files", "read_adapter_dir": "files", "save_adapter": "files", "write_adapter_files": "files",
    "model_card": "card",
    "describe_adapter": "catalog", "find_adapters": "catalog", "list_adapters": "catalog",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from lexlora.adapters.card import model_card  # noqa: F401
    from lexlora.adapters.catalog import describe_adapter, find_adapters, list_adapters  # noqa: F401
    from lexlora.adapters.files import (  # noqa: F401
        AdapterFiles,
        check_output_dir,
        load_adapter,
        read_adapter_dir,
        save_adapter,
        write_adapter_files,
    )
    from lexlora.adapters.fingerprint import check_fingerprint, fingerprint  # noqa: F401
    from lexlora.adapters.format import (  # noqa: F401
        CARD_NAME,
        CONFIG_NAME,
        FORMAT_VERSION,
        META_NAME,
        WEIGHTS_NAME,
        read_metadata,
    )
