"""`run_server`: what `lexlora serve` does. It builds the registry, loads every adapter dir under
the adapters dir, and serves the app with uvicorn until interrupted.

An adapter dir that fails to load stops the server before it starts (one AdapterError naming every
such dir and why), since a server quietly missing an adapter fails its clients later, with a 404
far from the cause. With `skip_invalid` it serves the rest instead, and lists what it skipped at
startup and in GET /health.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import uvicorn

from lexlora.adapters.catalog import find_adapters
from lexlora.errors import AdapterError, ConfigError, LexloraError
from lexlora.serving.app import create_app
from lexlora.serving.registry import LexLoRA
from lexlora.serving.settings import ServeSettings

logger = logging.getLogger(__name__)


def run_server(settings: ServeSettings) -> int:
    """Serve every adapter under `settings.adapters_dir` on `settings.host:settings.port`; returns
    the exit status once uvicorn stops. AdapterError if the dir is missing, no base loads, or an
    adapter fails to load (unless `settings.skip_invalid`)."""
    found = find_adapters(settings.adapters_dir)
    settings = dataclasses.replace(settings, device=resolve_device(settings.device))
    registry = _registry(settings, found)
    registry.lexical_cache_entries = settings.lexical_cache_entries
    failed = load_adapters(registry, found, allow_pickle=settings.allow_pickle)
    if failed and not settings.skip_invalid:
        raise AdapterError(
            f"{len(failed)} of the {len(found)} adapter dirs in {settings.adapters_dir} failed to load "
            f"(--skip-invalid serves the rest):{_listing(failed)}"
        )

    app = create_app(registry, settings.adapters_dir, settings, skipped=failed)
    url = f"http://{settings.host}:{settings.port}"
    print(f"lexlora: serving {len(registry)} adapter(s) on {url} with {registry.device} (API docs: {url}/docs)",
          flush=True)
    for info in registry.list_adapters():
        print(f"  {info['name']}  inputs: {', '.join(info['input_fields'])}  ({info['path']})", flush=True)
    if failed:
        print(f"lexlora: skipped {len(failed)} adapter dir(s) that failed to load:", flush=True)
        for name, reason in failed.items():
            print(f"  skipped {name}: {reason}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def resolve_device(device: str | None) -> str:
    """`auto` (or None) is CUDA when torch sees a GPU, else CPU, as a training run's Accelerator picks.
    A device torch does not know, or CUDA where there is none, is a ConfigError before any model loads."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device ({exc}); e.g. auto, cuda, cuda:1, cpu") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: torch sees no CUDA device here; use --device auto or cpu")
    return device


def load_adapters(registry: LexLoRA, found: Sequence[Path], allow_pickle: bool = False) -> dict[str, str]:
    """Load each dir under its dir name; returns the dirs that failed, name -> why."""
    failed = {}
    for path in found:
        try:
            registry.load_adapter(path, name=path.name, allow_pickle=allow_pickle)
        except (LexloraError, OSError) as exc:
            failed[path.name] = str(exc)
    return failed


def _registry(settings: ServeSettings, found: Sequence[Path]) -> LexLoRA:
    """A registry on `settings.base`, else on the base recorded by the first adapter whose base
    loads. A dir passed over here is still tried by `load_adapters`, which reports it if it fails."""
    if settings.base:
        return LexLoRA.from_pretrained(settings.base, device=settings.device)
    reasons = {}
    for path in found:
        try:
            return LexLoRA.for_adapter(path, device=settings.device)
        except LexloraError as exc:
            logger.warning("cannot load the base of adapter %s: %s", path.name, exc)
            reasons[path.name] = str(exc)
    raise AdapterError(
        f"no adapter dir in {settings.adapters_dir} names a loadable base ({len(found)} found); "
        f"pass --base MODEL_ID{_listing(reasons)}"
    )


def _listing(reasons: Mapping[str, str]) -> str:
    return "".join(f"\n  {name}: {reason}" for name, reason in reasons.items())
