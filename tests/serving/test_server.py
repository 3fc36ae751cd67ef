"""`lexlora serve` up to the point where uvicorn would take over (`run_server`): its options, which
adapters it loads at startup (none but --pin / --preload / --preload-all: the rest on first
request), and what it does about those that fail. uvicorn.run is replaced, so
nothing listens unless a test runs the app itself."""

import shutil

import pytest
import torch

from lexlora.cli import build_parser, main
from lexlora.serving import ServeSettings
from tests.serving import served
from tests.serving.served import DESC_INPUTS, call, running

adapters = served.adapters


def test_serve_cli_options_and_missing_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--adapters", "--host", "--port", "--base", "--device", "--max-inputs", "--max-input-chars",
                   "--max-batch-rows", "--batch-wait-ms", "--max-body-bytes", "--body-timeout-s", "--skip-invalid"):
        assert option in help_text
    args = build_parser().parse_args(["serve", "--adapters", "x"])
    assert (args.host, args.port, args.max_inputs, args.max_input_chars, args.max_batch_rows, args.batch_wait_ms,
            args.max_body_bytes, args.body_timeout_s) == ("127.0.0.1", 8000, 64, 1000, 32, 5.0, 4 << 20, 30.0)
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    assert "adapters dir not found" in capsys.readouterr().err


@pytest.fixture()
def uvicorn_run(monkeypatch):
    """uvicorn.run replaced: the dict gets the app it was given and its keyword arguments."""
    started = {}

    def fake_run(app, **kwargs):
        started.update(app=app, **kwargs)

    monkeypatch.setattr("uvicorn.run", fake_run)
    return started


@pytest.mark.parametrize("mode", ["allow", "refuse", "skip"])
def test_serve_loads_pickle_adapters_at_startup_only_with_allow_pickle(adapters, tmp_path, uvicorn_run, capsys, mode):
    from safetensors.torch import load_file

    from lexlora.adapters.format import WEIGHTS_NAME

    root = tmp_path / "served"
    shutil.copytree(adapters[0] / "plain", root / "plain")
    shutil.copytree(adapters[0] / "desc", root / "old")
    torch.save(load_file(str(root / "old" / WEIGHTS_NAME)), root / "old" / "adapter_model.bin")
    (root / "old" / WEIGHTS_NAME).unlink()
    options = {"allow": ["--allow-pickle"], "refuse": [], "skip": ["--skip-invalid"]}[mode]
    code = main(["serve", "--adapters", str(root), "--preload-all"] + options)
    if mode == "refuse":  # a pickle it may not read is a failing adapter: no server
        assert code == 2 and uvicorn_run == {}
        err = capsys.readouterr().err
        assert "old: " in err and "only a pickle adapter_model.bin is present" in err
        return
    assert code == 0
    registry = uvicorn_run["app"].state.registry
    assert sorted(registry.adapters) == (["old", "plain"] if mode == "allow" else ["plain"])
    if mode == "allow":
        assert registry.generate(DESC_INPUTS, adapter="old") == adapters[2].generate(DESC_INPUTS, adapter="desc")
    else:
        out = capsys.readouterr().out
        assert "skipped old: " in out and "only a pickle adapter_model.bin is present" in out


@pytest.fixture()
def mixed_root(adapters, tmp_path):
    """plain (loads), broken (lexlora.json is not JSON), xbase (trained on another base); xbase
    sorts after plain, so the registry is built on plain's base."""
    root = tmp_path / "served"
    shutil.copytree(adapters[0] / "plain", root / "plain")
    shutil.copytree(adapters[0] / "broken", root / "broken")
    shutil.copytree(adapters[1] / "otherbase", root / "xbase")
    return root


def test_serve_refuses_to_start_naming_every_adapter_that_fails(mixed_root, uvicorn_run, capsys):
    assert main(["serve", "--adapters", str(mixed_root), "--preload-all"]) == 2
    assert uvicorn_run == {}  # nothing was served
    err = capsys.readouterr().err
    assert err.startswith("lexlora: error: 2 of the 3 adapters to load at startup failed")
    assert "--skip-invalid" in err
    lines = err.splitlines()
    assert any(line.strip().startswith("broken: ") and "not valid JSON" in line for line in lines), err
    assert any(line.strip().startswith("xbase: ") and "different base" in line for line in lines), err
    assert not any(line.strip().startswith("plain: ") for line in lines), err


def test_skip_invalid_serves_the_rest_and_lists_what_it_skipped(mixed_root, adapters, uvicorn_run, capsys):
    assert main(["serve", "--adapters", str(mixed_root), "--preload-all", "--skip-invalid", "--port", "8123"]) == 0
    assert (uvicorn_run["host"], uvicorn_run["port"]) == ("127.0.0.1", 8123)
    app = uvicorn_run["app"]
    assert sorted(app.state.registry.adapters) == ["plain"]
    out = capsys.readouterr().out
    assert "  plain  inputs: filename" in out and "skipped 2 adapter(s) that failed to load" in out
    assert "skipped broken: " in out and "skipped xbase: " in out
    with running(app) as url:
        status, health = call(f"{url}/health")
        assert status == 200 and [s["name"] for s in health["skipped"]] == ["broken", "xbase"]
        assert "not valid JSON" in health["skipped"][0]["reason"]
        assert "different base" in health["skipped"][1]["reason"]
        # Fixed and loaded over HTTP, an adapter is no longer reported as skipped.
        shutil.rmtree(mixed_root / "xbase")
        shutil.copytree(adapters[1] / "extra", mixed_root / "xbase")
        assert call(f"{url}/adapters", "POST", {"name": "xbase"})[0] == 201
        assert [s["name"] for s in call(f"{url}/health")[1]["skipped"]] == ["broken"]


def test_no_loadable_base_names_each_adapter_and_why(adapters, tmp_path, uvicorn_run, capsys):
    root = tmp_path / "served"
    shutil.copytree(adapters[0] / "broken", root / "broken")
    assert main(["serve", "--adapters", str(root), "--skip-invalid"]) == 2
    assert uvicorn_run == {}
    err = capsys.readouterr().err
    assert "no adapter dir in" in err and "names a loadable base (1 tried); pass --base MODEL_ID" in err
    assert any(line.strip().startswith("broken: ") and "not valid JSON" in line for line in err.splitlines()), err


@pytest.mark.parametrize("cuda", [True, False])
def test_device_defaults_to_auto_cuda_when_present_else_cpu(monkeypatch, cuda):
    from lexlora.serving.server import resolve_device
    from lexlora.serving.settings import ServeSettings

    assert ServeSettings().device == "auto" and build_parser().parse_args(["serve", "--adapters", "x"]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_serve_says_its_device_and_refuses_a_bad_one_before_loading(adapters, tmp_path, uvicorn_run, capsys,
                                                                   monkeypatch):
    root = tmp_path / "served"
    shutil.copytree(adapters[0] / "plain", root / "plain")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--adapters", str(root)]) == 0
    assert uvicorn_run["app"].state.registry.device == torch.device("cpu")
    assert f"serving the adapters in {root} on http://127.0.0.1:8000 with cpu" in capsys.readouterr().out
    uvicorn_run.clear()
    for device, message in [("cdua", "--device 'cdua' is not a torch device"),
                            ("cuda", "--device 'cuda': torch sees no CUDA device here; use --device auto or cpu")]:
        assert main(["serve", "--adapters", str(root), "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and uvicorn_run == {}


def test_serve_options_reach_the_engine(adapters, uvicorn_run):
    """--engine, --max-queue and --max-batch-rows configure the worker; lexical vectors stay in memory."""
    assert main(["serve", "--adapters", str(adapters[0]), "--skip-invalid", "--max-queue", "7",
                 "--max-batch-rows", "5"]) == 0
    app = uvicorn_run["app"]
    worker = app.state.worker
    assert worker.name == "continuous" and worker.max_queue == 7 and worker.batch.capacity == 5
    assert app.state.registry.lexical_cache_entries == ServeSettings().lexical_cache_entries
    worker.close()
    uvicorn_run.clear()
    assert main(["serve", "--adapters", str(adapters[0]), "--skip-invalid", "--engine", "static"]) == 0
    assert uvicorn_run["app"].state.worker.name == "static"
    uvicorn_run["app"].state.worker.close()


def test_startup_loads_nothing_and_each_adapter_loads_on_its_first_request(mixed_root, uvicorn_run, capsys):
    """Without --preload-all a bad dir does not stop startup: it fails its own requests (and shows
    in /health while its failure is remembered), and the good ones load when first asked for."""
    assert main(["serve", "--adapters", str(mixed_root)]) == 0
    app = uvicorn_run["app"]
    assert len(app.state.registry) == 0 and app.state.store.known() == ["broken", "plain", "xbase"]
    with running(app) as url:
        assert call(f"{url}/health")[1]["adapters"] == 0
        status, body = call(f"{url}/generate", "POST", {"adapter": "plain", "inputs": DESC_INPUTS})
        assert status == 200 and len(body["outputs"]) == 2
        for name, status, text in [("broken", 422, "not valid JSON"), ("xbase", 422, "different base"),
                                   ("missing", 404, "no adapter named 'missing'")]:
            answer = call(f"{url}/generate", "POST", {"adapter": name, "inputs": ["a.py"]})
            assert answer[0] == status and text in answer[1]["detail"], (name, answer)
        health = call(f"{url}/health")[1]
        assert health["adapters"] == 1 and health["loads"] == 1 and health["load_failures"] == 3
        assert [s["name"] for s in health["skipped"]] == ["broken", "xbase", "missing"]


def test_pin_and_preload_load_at_startup_and_a_missing_name_stops_it(mixed_root, adapters, uvicorn_run, capsys):
    shutil.copytree(adapters[0] / "desc", mixed_root / "desc")
    assert main(["serve", "--adapters", str(mixed_root), "--pin", "desc", "--preload", "plain",
                 "--max-resident-adapters", "1"]) == 0
    store = uvicorn_run["app"].state.store
    assert sorted(store.registry.adapters) == ["desc", "plain"] and store.max_resident == 1
    assert store.acquire_sync("plain") and store._resident["desc"].pinned
    uvicorn_run.clear()
    assert main(["serve", "--adapters", str(mixed_root), "--pin", "nope"]) == 2
    assert "--pin / --preload name adapters with no dir" in capsys.readouterr().err and uvicorn_run == {}
