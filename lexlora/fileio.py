"""Files written whole or not at all: a staging dir beside the final name, renamed into place when
complete; and the SHA-256 digests that adapters and checkpoints record of their files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from lexlora.errors import AdapterError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_staging_dir(final: str | Path) -> Path:
    """A temp dir beside `final` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise AdapterError(f"cannot create a dir beside {final} to write the adapter in ({_reason(exc)})") from None
    # mkdtemp makes it private (0700); an adapter dir gets the usual permissions.
    staging.chmod(0o777 & ~_umask())
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
