import json
import re
import shutil

import pytest

from lexlora.adapters.catalog import (
    describe_adapter,
    find_adapters,
    format_table,
    list_adapters,
)
from lexlora.adapters.files import save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import CONFIG_NAME, META_NAME, WEIGHTS_NAME
from lexlora.cli import main
from lexlora.errors import AdapterError
from lexlora.model.loading import load_base_model
from tests.conftest import tiny_model_config
from tests.helpers import make_model, perturb_

FULL_META = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None},
    "dataset": {"path": "data/files.jsonl", "sha256": "ab" * 32, "splits": {"train": 90, "validation": 10}},
    "training": {"learning_rate": 0.001, "max_steps": 40},
    "metrics": {"final_val_loss": 1.23456, "best_val_loss": 1.2, "steps": 40, "trainable_params": 1234,
                "history": [1, 2]},
}


def cells(line, maxsplit=0):
    """Table and key/value output separate columns by two or more spaces."""
    return re.split(r" {2,}", line.strip(), maxsplit=maxsplit)


def details(out):
    return dict(cells(line, 1) for line in out.strip("\n").split("\n"))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer):
    """alpha: full metadata, fusion add, r 4. beta: only the required keys, no fusion, r 8.
    broken: invalid lexlora.json. Plus a staging dir, a dir without metadata and a file to skip."""
    root = tmp_path_factory.mktemp("adapters")
    for name, mode, r, extra in [("alpha", "add", 4, FULL_META), ("beta", None, 8, {})]:
        base = load_base_model(tiny_model_config())
        model = make_model(base, tokenizer, mode, r=r)
        perturb_(model)
        save_adapter(model, root / name, {"base": fingerprint(base, tiny_model_config()), **extra})
    (root / "broken").mkdir()
    (root / "broken" / META_NAME).write_text("{not json")
    shutil.copytree(root / "beta", root / ".beta.tmp-1234")
    (root / "notes").mkdir()
    (root / "README.md").write_text("not an adapter")
    return root


def test_find_adapters_skips_hidden_and_plain_dirs(root):
    assert [p.name for p in find_adapters(root)] == ["alpha", "beta", "broken"]
    assert find_adapters(root / "alpha") == [root / "alpha"]  # an adapter dir lists itself


def test_describe_full_and_minimal_metadata(root):
    alpha = describe_adapter(root / "alpha")
    assert (alpha["base"], alpha["random_init"], alpha["init_seed"]) == ("google/flan-t5-small", True, 0)
    assert alpha["dataset"] == "data/files.jsonl" and alpha["splits"] == {"train": 90, "validation": 10}
    assert (alpha["rank"], alpha["alpha"], alpha["fusion_mode"]) == (4, 8, "add")
    # lexlora.json says null (the default); adapter_config.json has the modules PEFT resolved.
    assert sorted(alpha["target_modules"]) == ["k", "o", "q", "v"]
    assert alpha["weights_bytes"] == (root / "alpha" / WEIGHTS_NAME).stat().st_size
    assert alpha["val_loss"] == 1.23456 and alpha["steps"] == 40
    assert alpha["metrics"]["trainable_params"] == 1234 and "history" not in alpha["metrics"]
    assert "checksum" not in alpha

    beta = describe_adapter(root / "beta")
    assert beta["rank"] == 8 and beta["fusion_mode"] is None  # rank from adapter_config.json
    assert beta["dataset"] is None and beta["val_loss"] is None and beta["metrics"] == {}


def test_rank_falls_back_to_metadata_without_peft_config(root, tmp_path):
    shutil.copytree(root / "alpha", tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).unlink()
    info = describe_adapter(tmp_path / "a")
    assert (info["rank"], info["alpha"], info["target_modules"]) == (4, 8, None)


def test_list_prints_a_row_per_adapter_and_reports_the_broken_one(root, capsys):
    assert main(["adapters", "list", str(root)]) == 0
    out, err = capsys.readouterr()
    header, alpha, beta, broken = map(cells, out.strip("\n").split("\n"))
    assert header == ["NAME", "BASE", "DATASET", "RANK", "FUSION", "SIZE", "VAL LOSS"]
    base = "google/flan-t5-small (random init, seed 0)"
    size = f"{(root / 'alpha' / WEIGHTS_NAME).stat().st_size / 1e6:.2f} MB"
    assert alpha == ["alpha", base, "data/files.jsonl", "4", "add", size, "1.2346"]
    assert beta[:5] == ["beta", base, "-", "8", "off"] and beta[6] == "-"
    assert broken[0] == "broken" and broken[1].startswith("error: ") and "not valid JSON" in broken[1]
    assert "warning" in err and "broken" in err and "not valid JSON" in err


def test_list_json(root, capsys):
    assert main(["adapters", "list", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["alpha", "beta", "broken"]
    assert rows[0]["rank"] == 4 and rows[0]["val_loss"] == 1.23456 and rows[0]["dataset"] == "data/files.jsonl"
    assert rows[1]["dataset"] is None and rows[1]["fusion_mode"] is None
    assert "not valid JSON" in rows[2]["error"]


def test_list_of_an_empty_dir_is_just_the_header(tmp_path, capsys):
    assert main(["adapters", "list", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert cells(out) == ["NAME", "BASE", "DATASET", "RANK", "FUSION", "SIZE", "VAL LOSS"]
    assert "no adapter dirs" in err
    assert format_table([]).startswith("NAME")


def test_show_prints_rank_size_metrics_and_checksum(root, capsys):
    assert main(["adapters", "show", str(root / "alpha")]) == 0
    out, err = capsys.readouterr()
    lines = details(out)
    assert lines["rank"] == "4" and lines["alpha"] == "8" and lines["fusion"].startswith("add (")
    assert lines["size"].endswith(f"({(root / 'alpha' / WEIGHTS_NAME).stat().st_size:,} bytes)")
    assert lines["checksum"] == "ok" and lines["val loss"] == "1.2346"
    assert lines["metrics.trainable_params"] == "1234" and lines["training.learning_rate"] == "0.001"
    assert lines["splits"] == "train 90, validation 10"
    assert lines["prompt template"] == "Describe {filename}:" and lines["lexical field"] == "filename"
    assert err == ""


def test_show_minimal_adapter_uses_dashes(root, capsys):
    assert main(["adapters", "show", str(root / "beta")]) == 0
    lines = details(capsys.readouterr().out)
    assert lines["dataset"] == lines["splits"] == lines["val loss"] == lines["steps"] == "-"
    assert (lines["fusion"], lines["rank"], lines["alpha"], lines["checksum"]) == ("off", "8", "16", "ok")
    assert not any(key.startswith(("metrics.", "training.")) for key in lines)


def test_show_json_and_checksum_mismatch(root, tmp_path, capsys):
    adapter = tmp_path / "alpha"
    shutil.copytree(root / "alpha", adapter)
    assert main(["adapters", "show", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checksum"] == "ok" and info["rank"] == 4 and info["metrics"]["final_val_loss"] == 1.23456

    weights = adapter / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["adapters", "show", str(adapter), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["checksum"] == "MISMATCH" and "MISMATCH" in err
    assert main(["adapters", "show", str(adapter)]) == 0
    assert "checksum" in (out := capsys.readouterr().out) and "MISMATCH" in out


@pytest.mark.parametrize("command", ["list", "show"])
def test_missing_dir_is_a_clear_error(tmp_path, capsys, command):
    missing = tmp_path / "nowhere"
    assert main(["adapters", command, str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lexlora: error:") and str(missing) in err and "not found" in err


def test_not_a_directory_and_not_an_adapter(root, capsys):
    assert main(["adapters", "list", str(root / "README.md")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["adapters", "show", str(root / "notes")]) == 2
    assert "not a lexlora adapter dir" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="not valid JSON"):
        describe_adapter(root / "broken")
    assert [r["name"] for r in list_adapters(root / "broken")] == ["broken"]
