"""Files written whole or not at all: a staging dir (or file) beside the final name, renamed into
place when complete; and the SHA-256 digests that adapters and checkpoints record of their files.

The staging names are spelled here only, so that whatever looks for leftovers (a resumed run, a
checkpoint save, the adapter catalog) recognises every writer's:

    .NAME.tmp-XXXXXXXX     a private staging dir or file of NAME (`make_staging_dir`, `atomic_write_text`)
    .NAME.failed-XXXXXXXX  a staging dir kept after a failed run, for inspection (`failed_name`)
    .tmp-NAME              a staging dir every process of a run names alike (`shared_staging`)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from lexlora.errors import AdapterError

STAGING_MARK = ".tmp-"
FAILED_MARK = ".failed-"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staging_prefix(final: str | Path) -> str:
    """The name prefix of `final`'s private staging dirs and files (a random part follows)."""
    return f".{Path(final).name}{STAGING_MARK}"


def is_staging_of(path: str | Path, final: str | Path) -> bool:
    """Whether `path` is one of `final`'s private staging dirs or files (beside it)."""
    path, final = Path(path), Path(final)
    return path.parent == final.parent and path.name.startswith(staging_prefix(final))


def failed_name(staging: Path) -> Path:
    """Where a failed run's staging dir is kept: beside it, under a name that is not a staging one."""
    return staging.with_name(staging.name.replace(STAGING_MARK, FAILED_MARK, 1))


def shared_staging(final: Path) -> Path:
    """A staging path for `final` with no random part, which several processes can name alike."""
    return final.with_name(STAGING_MARK + final.name)


def is_shared_staging(path: Path) -> bool:
    return path.name.startswith(STAGING_MARK)


def unstaged_name(path: Path) -> str:
    """The final name a `shared_staging` path stands for (a final name is returned as it is)."""
    return path.name.removeprefix(STAGING_MARK)


def make_staging_dir(final: str | Path) -> Path:
    """A temp dir beside `final` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final), dir=final.parent))
    except OSError as exc:
        raise AdapterError(f"cannot create a dir beside {final} to write the adapter in ({os_reason(exc)})") from None
    # mkdtemp makes it private (0700); an adapter dir gets the usual permissions.
    staging.chmod(0o777 & ~current_umask())
    return staging


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a staging file: a reader sees the old file or the new, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=staging_prefix(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
