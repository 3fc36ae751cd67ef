"""`lexlora embeddings`: cosine figures, neighbours and t-SNE, with a fake trigram encoder (fast,
exact) and once with the real all-MiniLM-L6-v2 through the CLI."""

import hashlib
import json

import pytest
import torch

from lexlora.evaluation import diagnostics
from lexlora.cli import main
from lexlora.evaluation.diagnostics import (
    EDIT_KINDS,
    cosine_stats,
    file_extension,
    light_edits,
    nearest_neighbours,
    run_diagnostics,
    tsne_png,
)

TEXTS = [
    "report_final.py", "report_final_v2.py", "monitor_windows.py", "extract_events.json", "backup_config.yaml",
    "train_model.py", "README.md", "setup.cfg", "tsne_plot.ipynb", "invoice_2021.pdf", "cat_photo.jpg",
    "requirements.txt", "db_migrate.sql", "main.rs", "index.html", "style.css",
]


def fake_encode(texts):
    """Hashed character trigrams, L2-normalised: similar strings get similar vectors, deterministically."""
    out = torch.zeros(len(texts), 256)
    for row, text in enumerate(texts):
        padded = f"  {text.lower()} "
        for i in range(len(padded) - 2):
            out[row, hashlib.md5(padded[i:i + 3].encode()).digest()[0]] += 1.0
    return torch.nn.functional.normalize(out, dim=-1)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def without_timing(result):
    return {k: v for k, v in result.items() if k != "seconds"}


def test_file_extension_and_light_edits():
    assert file_extension("asyncio/base_events.py") == ".py"
    assert file_extension("monitor_windows") is None
    assert file_extension("Python 3.11") is None  # a version, not an extension
    assert file_extension("Ends a sentence.") is None
    assert light_edits("report.py") == {
        "delete": "reprt.py", "swap": "reoprt.py", "suffix": "report_v2.py", "case": "REPORT.PY",
    }
    assert set(light_edits("a")) == {"suffix", "case"}  # a 1-char stem cannot lose or swap a character
    assert "swap" not in light_edits("abba")  # swapping 'bb' changes nothing
    assert light_edits("ABC")["case"] == "abc"
    assert set(EDIT_KINDS) == {"delete", "swap", "suffix", "case"}


def test_cosine_stats_orders_self_edited_random():
    stats = cosine_stats(TEXTS, fake_encode, seed=0)
    assert stats["self"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["random_pair"]["mean"] < stats["edited"]["overall"]["mean"] < stats["self"]["mean"]
    assert stats["random_pair"]["n"] == len(TEXTS)
    assert stats["edited"]["overall"]["n"] == sum(len(light_edits(t)) for t in TEXTS)
    # The fake encoder lowercases, so a case edit is invisible to it.
    assert stats["edited"]["by_kind"]["case"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["edited_closer_than_random"] == 1.0
    assert cosine_stats(TEXTS, fake_encode, seed=0) == stats
    assert cosine_stats(TEXTS, fake_encode, seed=1)["random_pair"] != stats["random_pair"]


def test_nearest_neighbours_finds_the_near_duplicate_first():
    vectors = fake_encode(TEXTS)
    result = nearest_neighbours(TEXTS, vectors, [0, 1], k=3)
    assert result[0]["query"] == "report_final.py"
    assert result[0]["neighbours"][0]["text"] == "report_final_v2.py"
    assert result[1]["neighbours"][0]["text"] == "report_final.py"
    for item in result:
        assert len(item["neighbours"]) == 3
        assert item["query"] not in [n["text"] for n in item["neighbours"]]
        cosines = [n["cosine"] for n in item["neighbours"]]
        assert cosines == sorted(cosines, reverse=True)


def test_run_diagnostics_writes_json_markdown_and_png(tmp_path):
    result = run_diagnostics(TEXTS, fake_encode, tmp_path, seed=3, neighbours=4, queries=3, source={"field": "f"})
    data = json.loads((tmp_path / "embeddings.json").read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("source", "self", "random_pair", "edited", "edit_kinds", "neighbours", "tsne"):
        assert key in data
    assert data["source"] == {"field": "f", "sample": len(TEXTS), "seed": 3, "dim": 256}
    assert len(data["neighbours"]) == 3 and all(len(n["neighbours"]) == 4 for n in data["neighbours"])
    assert data["tsne"]["color_by"] == "file extension"  # the texts have several
    same = run_diagnostics([t.rsplit(".", 1)[0] + ".py" for t in TEXTS], fake_encode, tmp_path / "py")
    assert same["tsne"]["color_by"] is None and same["tsne"]["legend"] is None

    report = (tmp_path / "embeddings.md").read_text()
    for text in ("itself, re-encoded", "a random other text", "a lightly edited version", "edit: swap",
                 f"{data['random_pair']['mean']:.3f}", "## Nearest neighbours", "![t-SNE](tsne.png)"):
        assert text in report
    png = (tmp_path / "tsne.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_same_seed_same_figures(tmp_path):
    first = run_diagnostics(TEXTS, fake_encode, tmp_path / "a", seed=7)
    second = run_diagnostics(TEXTS, fake_encode, tmp_path / "b", seed=7)
    assert without_timing(first) == without_timing(second)
    assert (tmp_path / "a" / "tsne.png").read_bytes() == (tmp_path / "b" / "tsne.png").read_bytes()
    assert without_timing(run_diagnostics(TEXTS, fake_encode, tmp_path / "c", seed=8)) != without_timing(first)


def test_tsne_copes_with_five_points_and_many_classes(tmp_path):
    info = tsne_png(fake_encode(TEXTS[:5]), None, tmp_path / "five.png")
    assert info["points"] == 5 and info["perplexity"] < 5
    labels = [f"class{i}" for i in range(len(TEXTS))]  # 16 classes: 9 shown, the rest as 'other'
    info = tsne_png(fake_encode(TEXTS), labels, tmp_path / "many.png")
    assert len(info["legend"]) == diagnostics.MAX_LEGEND_CLASSES and info["legend"][-1] == "other"


@pytest.fixture()
def fake_model(monkeypatch):
    """The CLI's encoder swapped for the fake one, for the tests that are not about the model."""
    fake = lambda model_id, cache_dir=None: (fake_encode, fake_encode)  # noqa: E731
    monkeypatch.setattr(diagnostics, "lexical_encode_functions", fake)


def test_cli_samples_colours_by_field_and_prints_figures(tmp_path, fake_model, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"name": t, "kind": t.rsplit(".", 1)[-1]} for t in TEXTS * 2])
    out = tmp_path / "out"
    code = main(["embeddings", "--data", str(data), "--field", "name", "--sample", "10", "--seed", "1",
                 "--color-field", "kind", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "embeddings.json").read_text())
    assert result["source"]["sample"] == 10 and result["source"]["distinct"] == len(TEXTS)
    assert result["tsne"]["color_by"] == "field 'kind'"
    printed = capsys.readouterr().out
    assert f"report: {out / 'embeddings.md'}" in printed
    assert f"{result['random_pair']['mean']:.4f}" in printed


def test_cli_takes_data_field_and_model_from_an_adapter(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"filename": t, "description": "x"} for t in TEXTS])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    meta = {"format_version": 1, "base": {}, "weights": {}, "dataset": {"path": str(data)},
            "adapter": {"lexical_field": "filename", "fusion_mode": "add", "embedding_model": "some/model"}}
    (adapter / "lexlora.json").write_text(json.dumps(meta))
    assert main(["embeddings", "--adapter", str(adapter), "--sample", "8"]) == 0
    result = json.loads((adapter / "eval" / "embeddings" / "embeddings.json").read_text())
    assert result["source"]["field"] == "filename" and result["source"]["model"] == "some/model"

    meta["adapter"]["fusion_mode"] = None
    (adapter / "lexlora.json").write_text(json.dumps(meta))
    assert main(["embeddings", "--adapter", str(adapter)]) == 2


def test_cli_bad_input_exits_2_naming_file_and_field(tmp_path, fake_model, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["embeddings", "--data", str(missing), "--field", "filename", "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err

    data = write_jsonl(tmp_path / "d.jsonl", [{"filename": t} for t in TEXTS])
    assert main(["embeddings", "--data", str(data), "--field", "name", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lexlora: error:" in err and str(data) in err and "'name' is missing" in err

    few = write_jsonl(tmp_path / "few.jsonl", [{"filename": t} for t in ["a.py", "b.py", "a.py", "c.py"]])
    assert main(["embeddings", "--data", str(few), "--field", "filename", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(few) in err and "'filename' has 3 distinct value(s)" in err

    assert main(["embeddings", "--field", "filename"]) == 2
    assert "--data FILE" in capsys.readouterr().err


def test_cli_with_the_real_model(stdlib_data, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["embeddings", "--data", str(stdlib_data), "--field", "filename", "--sample", "40", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "embeddings.json").read_text())
    assert result["source"]["dim"] == 384 and result["source"]["sample"] == 40
    assert result["self"]["mean"] > 0.99
    assert result["random_pair"]["mean"] < result["edited"]["overall"]["mean"]
    assert result["tsne"]["color_by"] is None  # every stdlib filename ends in .py: nothing to colour
    assert (out / "tsne.png").stat().st_size > 10_000
