"""`run_server`: what `lexlora serve` does. It builds the registry on one base and serves the app
with uvicorn until interrupted. Adapters are loaded on first request (store.py), so startup reads
one adapter's metadata at most (to learn the base, when --base is not given), whatever the number of
adapter dirs; `--pin` / `--preload` load some at startup, `--preload-all` every dir (as before the
store existed).

An adapter that fails to load at startup stops the server before it starts (one AdapterError naming
every such adapter and why), since a server quietly missing an adapter it was told to hold fails its
clients later, far from the cause. With `skip_invalid` it serves without them instead, and lists
them at startup and in GET /health.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import uvicorn

from lexlora.adapters.catalog import find_adapters
from lexlora.adapters.format import META_NAME
from lexlora.errors import AdapterError, ConfigError, LexloraError
from lexlora.serving.app import create_app
from lexlora.serving.auth import api_key_from
from lexlora.serving.registry import LexLoRA
from lexlora.serving.settings import ServeSettings

logger = logging.getLogger(__name__)


def run_server(settings: ServeSettings) -> int:
    """Serve the adapters under `settings.adapters_dir` on `settings.host:settings.port`; returns the
    exit status once uvicorn stops. AdapterError if the dir is missing, no base loads, or a pinned /
    preloaded adapter fails to load (unless `settings.skip_invalid`). (`settings.ray` is
    ray_app.run_ray_server's.)"""
    root = Path(settings.adapters_dir)
    settings, registry, failed = prepare_registry(settings)
    app = create_app(registry, root, settings, skipped=failed)
    url = f"http://{settings.host}:{settings.port}"
    store = app.state.store
    print(f"lexlora: serving the adapters in {root} on {url} with {registry.device}, loaded on first request, "
          f"at most {store.max_resident} resident (API docs: {url}/docs; OpenAI API: {url}/v1)", flush=True)
    for info in registry.list_adapters():
        print(f"  {info['name']}  inputs: {', '.join(info['input_fields'])}  ({info['path']})", flush=True)
    if failed:
        print(f"lexlora: skipped {len(failed)} adapter(s) that failed to load:", flush=True)
        for name, reason in failed.items():
            print(f"  skipped {name}: {reason}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def check_settings(settings: ServeSettings) -> list[str]:
    """What can be refused before any model loads: a missing adapters dir, a bad API key, startup
    names with no dir. Returns the adapters to load at startup."""
    if not Path(settings.adapters_dir).is_dir():
        raise AdapterError(f"adapters dir not found: {settings.adapters_dir}")
    api_key_from(settings.api_key)
    return _startup_names(settings)


def prepare_registry(settings: ServeSettings) -> tuple[ServeSettings, LexLoRA, dict[str, str]]:
    """(settings with the device resolved, the registry with its startup adapters loaded, the ones
    that failed to load: name -> why). What `lexlora serve` and each Ray replica do before serving."""
    wanted = check_settings(settings)
    settings = dataclasses.replace(settings, device=resolve_device(settings.device))
    registry = _registry(settings)
    registry.lexical_cache_entries = settings.lexical_cache_entries
    registry.router.keep_hooks = True
    failed = load_adapters(registry, Path(settings.adapters_dir), wanted, allow_pickle=settings.allow_pickle)
    if failed and not settings.skip_invalid:
        raise AdapterError(
            f"{len(failed)} of the {len(wanted)} adapters to load at startup failed "
            f"(--skip-invalid serves without them):{_listing(failed)}"
        )
    return settings, registry, failed


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


def load_adapters(registry: LexLoRA, root: Path, names: Sequence[str], allow_pickle: bool = False) -> dict[str, str]:
    """Load each named dir under `root`; returns the ones that failed, name -> why."""
    failed = {}
    for name in names:
        try:
            registry.load_adapter(root / name, name=name, allow_pickle=allow_pickle)
        except (LexloraError, OSError) as exc:
            failed[name] = str(exc)
    return failed


def _startup_names(settings: ServeSettings) -> list[str]:
    """What startup loads: every dir with --preload-all, else the pins and preloads, in order, once."""
    if settings.preload_all:
        return [p.name for p in find_adapters(settings.adapters_dir)]
    names = list(dict.fromkeys([*settings.pin, *settings.preload]))
    missing = [n for n in names if not (Path(settings.adapters_dir) / n).is_dir()]
    if missing:
        raise AdapterError(f"--pin / --preload name adapters with no dir in {settings.adapters_dir}: {', '.join(missing)}")
    return names


def _registry(settings: ServeSettings) -> LexLoRA:
    """A registry on `settings.base`, else on the base recorded by the first adapter (in name order)
    whose base loads. Only that adapter's metadata is read: the others cost startup a stat each."""
    if settings.base:
        return LexLoRA.from_pretrained(settings.base, device=settings.device, task=settings.task)
    reasons = {}
    for path in _adapter_dirs(Path(settings.adapters_dir), first=[*settings.pin, *settings.preload]):
        try:
            return LexLoRA.for_adapter(path, device=settings.device)
        except LexloraError as exc:
            logger.warning("cannot load the base of adapter %s: %s", path.name, exc)
            reasons[path.name] = str(exc)
            if len(reasons) >= 5:
                break
    raise AdapterError(
        f"no adapter dir in {settings.adapters_dir} names a loadable base ({len(reasons)} tried); "
        f"pass --base MODEL_ID{_listing(reasons)}"
    )


def _adapter_dirs(root: Path, first: Sequence[str] = ()) -> list[Path]:
    """Adapter dirs (those with a lexlora.json): the named ones first, then the rest by name."""
    named = [root / name for name in first if (root / name / META_NAME).is_file()]
    return named + [p for p in find_adapters(root) if p not in named]


def _listing(reasons: Mapping[str, str]) -> str:
    return "".join(f"\n  {name}: {reason}" for name, reason in reasons.items())
