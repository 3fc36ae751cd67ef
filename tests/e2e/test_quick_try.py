"""The README's quick try (configs/quick_try.yaml): a real pretrained base that loads offline, on data
shipped in the repo, trained and then scored by `lexlora eval`. Shrunk to a few rows and steps here;
the full run and its figures are in benchmarks/results/quick_try.md."""

import json
import re

from lexlora.cli import main
from lexlora.config import load_config
from lexlora.training import train
from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "quick_try.yaml"
# The real warm-started MiniLM encoder-decoder (~2 x 22M parameters): a handful of short rows and
# two steps keep it to seconds.
SHRINK = [
    "data.splits.train='[:8]'", "data.splits.validation='[8:12]'", "data.splits.test='[12:16]'",
    "data.max_target_length=12", "train.max_steps=2", "train.batch_size=4",
    "generation.max_new_tokens=4",
]


def quick_try_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick try", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_the_quick_try_needs_only_the_repo_and_the_embedding_model():
    cfg = load_config(CONFIG)
    # From a fresh clone: the data is in the repo, the base is built from the fusion model itself.
    assert (ROOT / cfg.data.path).is_file() and cfg.data.path.startswith("examples/")
    assert cfg.model.name_or_path == f"encoder-decoder:{cfg.fusion.embedding_model}"
    assert not cfg.model.random_init
    assert {"train", "validation", "test"} <= set(cfg.data.splits)
    assert cfg.data.shuffle_seed is not None  # the file is sorted by path


def test_the_readme_quick_try_runs_this_config_and_scores_the_test_split():
    block = quick_try_block()
    assert "--config configs/quick_try.yaml" in block
    out = load_config(CONFIG).output_dir
    assert f"lexlora eval --adapter {out} --split test" in block
    assert f"lexlora generate --adapter {out}" in block
    assert "smoke.yaml" not in block


def test_quick_try_config_trains_and_lexlora_eval_scores_it(tmp_path, capsys):
    out = tmp_path / "quick-try"
    # The config's paths are relative to the repo root, where the README runs it; pytest may run elsewhere.
    data = ROOT / load_config(CONFIG).data.path
    cfg = load_config(CONFIG, [*SHRINK, f"data.path={data}", f"output_dir={out}"])
    train(cfg)
    meta = json.loads((out / "lexlora.json").read_text())
    assert meta["base"]["model_id"] == cfg.model.name_or_path

    assert main(["eval", "--adapter", str(out), "--split", "test"]) == 0
    assert "rouge1" in capsys.readouterr().out
    result = json.loads((out / "eval" / "test" / "eval.json").read_text())
    assert result["split"] == "test" and result["count"] == 4
    assert 0.0 <= result["adapter_scores"]["rouge1"] <= 1.0
    assert "rouge1" in result["base_scores"]
