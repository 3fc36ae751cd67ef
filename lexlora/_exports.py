"""Package re-exports resolved on first use (PEP 562), so that `import lexlora.adapters` stays light:
`lexlora adapters list` reads metadata without importing torch, and a package never imports a
submodule it does not need. Each package lists its public names and the submodule of each."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps a public name to its submodule."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
