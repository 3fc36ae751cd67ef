"""The staging names every writer uses (lexlora.fileio): adapter dirs, failed runs' logs, checkpoint
saves, ablation tables and the embedding cache all spell them through the same helpers."""

import os

import pytest

from lexlora.fileio import (
    atomic_write_text,
    failed_name,
    is_shared_staging,
    is_staging_of,
    make_staging_dir,
    shared_staging,
    unstaged_name,
)


def test_a_staging_dir_is_recognised_as_its_final_names_and_its_failed_name_is_not(tmp_path):
    final = tmp_path / "adapter"
    staging = make_staging_dir(final)
    assert staging.parent == tmp_path and staging.name.startswith(".adapter.tmp-")
    assert is_staging_of(staging, final) and not is_staging_of(staging, tmp_path / "adapter2")
    assert not is_staging_of(tmp_path / "other" / staging.name, final)  # beside the final name only
    failed = failed_name(staging)
    assert failed.parent == tmp_path and failed.name == staging.name.replace(".tmp-", ".failed-")
    assert not is_staging_of(failed, final)
    assert staging.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_a_shared_staging_path_has_no_random_part(tmp_path):
    final = tmp_path / "step00000004-epoch001"
    assert shared_staging(final) == shared_staging(final) == tmp_path / ".tmp-step00000004-epoch001"
    assert is_shared_staging(shared_staging(final)) and not is_shared_staging(final)
    assert unstaged_name(shared_staging(final)) == unstaged_name(final) == final.name


def test_atomic_write_text_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    path = tmp_path / "ablation.md"
    assert atomic_write_text(path, "one\n") == path and path.read_text() == "one\n"
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["ablation.md"]

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "three\n")
    assert path.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["ablation.md"]


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
