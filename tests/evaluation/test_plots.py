import json
import struct

import pytest

from lexlora.evaluation.plots import loss_curve_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # IHDR width, height


RUN = [
    {"step": 2, "epoch": 0, "loss": 4.0, "lr": 1e-3, "seconds": 0.1},
    {"step": 4, "epoch": 0, "loss": 3.0, "lr": 1e-3, "seconds": 0.2},
    {"step": 4, "epoch": 1, "val_loss": 3.5, "rougeL": 0.10, "best": True},
    {"step": 6, "epoch": 1, "loss": 2.5, "lr": 5e-4, "seconds": 0.3},
    {"step": 8, "epoch": 1, "loss": 2.0, "lr": 0.0, "seconds": 0.4},
    {"step": 8, "epoch": 2, "val_loss": 3.2, "rougeL": 0.08, "best": False},
    {"summary": {"steps": 8, "eval_metric": "rougeL"}},
]


def test_loss_curve_from_a_hand_made_log(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", RUN)
    out = loss_curve_png(log, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert png_size(out) == (770, 440)


def test_the_metric_axis_comes_from_the_summary_or_the_argument(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", RUN)
    from_summary = loss_curve_png(log, tmp_path / "a.png").read_bytes()
    explicit = loss_curve_png(log, tmp_path / "b.png", metric="rougeL").read_bytes()
    loss_only = loss_curve_png(log, tmp_path / "c.png", metric="val_loss").read_bytes()
    assert from_summary == explicit != loss_only
    # A metric the log does not have is left out rather than failing.
    assert loss_curve_png(log, tmp_path / "d.png", metric="accuracy").read_bytes() == loss_only


def test_training_loss_only_and_empty_logs(tmp_path):
    only_train = write_log(tmp_path / "train.jsonl", [r for r in RUN if "loss" in r])
    assert png_size(loss_curve_png(only_train, tmp_path / "t.png")) == (770, 440)
    empty = write_log(tmp_path / "empty.jsonl", [{"summary": {"steps": 0}}])
    with pytest.raises(ValueError, match="nothing|no training"):
        loss_curve_png(empty, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
