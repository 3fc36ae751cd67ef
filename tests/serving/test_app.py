"""The endpoints of `create_app`, served in-process by uvicorn and called with the stdlib: health,
listing, generation, the OpenAPI schema, loading and unloading adapters at run time."""

import json
import shutil
import urllib.request

from tests.serving import served
from tests.serving.served import (
    DESC_INPUTS,
    FILES_INPUTS,
    assert_still_serving,
    call,
    generate,
)

adapters, server = served.adapters, served.server


def test_health_and_list(server, adapters):
    url, _ = server
    status, health = call(f"{url}/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 3
    assert {"batches", "rows", "mixed_batches", "pending"} <= set(health)
    assert health["skipped"] == []  # create_app was told of no startup failures
    status, listing = call(f"{url}/adapters")
    assert status == 200
    assert {a["name"] for a in listing["adapters"]} == {"desc", "plain", "files"}
    by_name = sorted(adapters[2].list_adapters(), key=lambda a: a["name"])
    assert listing["adapters"] == json.loads(json.dumps(by_name))  # the resident adapters, by name
    files = next(a for a in listing["adapters"] if a["name"] == "files")
    assert files["input_fields"] == ["file", "directory"]

def test_generate_matches_the_registry_alone(server, adapters):
    url, _ = server
    registry = adapters[2]
    status, body = generate(url, "desc", DESC_INPUTS)
    assert status == 200 and body["outputs"] == registry.generate(DESC_INPUTS, adapter="desc")
    status, body = generate(url, "files", FILES_INPUTS)
    assert status == 200 and body["outputs"] == registry.generate(FILES_INPUTS, adapter="files")
    status, body = generate(url, "plain", [{"filename": "a.py", "unused": "x"}], max_new_tokens=3, num_beams=2)
    assert status == 200
    assert body["outputs"] == registry.generate(["a.py"], adapter="plain", max_new_tokens=3, num_beams=2)

def test_openapi_schema_and_docs(server):
    url, _ = server
    status, schema = call(f"{url}/openapi.json")
    assert status == 200
    assert {"/health", "/adapters", "/adapters/{name}", "/generate", "/v1/completions", "/v1/chat/completions",
            "/v1/models"} <= set(schema["paths"])
    assert {"GenerateRequest", "GenerateResponse", "AdapterInfo"} <= set(schema["components"]["schemas"])
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    assert set(schema["components"]["schemas"]["GenerateRequest"]["properties"]) == {
        "adapter", "inputs", "max_new_tokens", "num_beams", "min_new_tokens", "do_sample", "temperature", "top_k",
        "top_p", "repetition_penalty", "seed", "stop", "stream", "constrain"}
    with urllib.request.urlopen(f"{url}/docs", timeout=10) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()

def test_load_at_run_time_then_delete(server, adapters):
    url, _ = server
    root, spare, registry = adapters
    assert generate(url, "extra", ["a.py"])[0] == 404
    assert call(f"{url}/adapters", "POST", {"name": "extra"})[0] == 404  # not copied in yet
    shutil.copytree(spare / "extra", root / "extra")
    status, info = call(f"{url}/adapters", "POST", {"name": "extra"})
    assert status == 201 and info["name"] == "extra" and info["input_fields"] == ["filename"]
    assert call(f"{url}/adapters", "POST", {"name": "extra"})[0] == 409
    status, body = generate(url, "extra", ["a.py"])
    assert status == 200 and body["outputs"] == registry.generate(["a.py"], adapter="extra")
    assert call(f"{url}/health")[1]["adapters"] == 4

    status, body = call(f"{url}/adapters/extra", "DELETE")
    assert status == 200 and body == {"deleted": "extra", "adapters": 3}
    assert "extra" not in registry
    assert call(f"{url}/adapters/extra", "DELETE")[0] == 404
    # Unloaded, not forgotten: its dir is still there, so its next request loads it again.
    status, body = generate(url, "extra", ["a.py"])
    assert status == 200 and "extra" in registry
    assert call(f"{url}/adapters/extra", "DELETE")[0] == 200
    shutil.rmtree(root / "extra")
    status, body = generate(url, "extra", ["a.py"])
    assert status == 404 and "extra" in body["detail"]

def test_broken_adapter_dir_is_refused_with_its_error(server, adapters):
    url, _ = server
    status, body = call(f"{url}/adapters", "POST", {"name": "broken"})
    assert status == 422 and "not valid JSON" in body["detail"]
    assert "broken" not in adapters[2]
    assert_still_serving(url, adapters[2])

def test_adapter_of_another_base_is_refused(server, adapters):
    url, _ = server
    root, spare, registry = adapters
    shutil.copytree(spare / "otherbase", root / "otherbase")
    status, body = call(f"{url}/adapters", "POST", {"name": "otherbase"})
    assert status == 422 and "this adapter was trained on a different base (weights differ" in body["detail"]
    assert "otherbase" not in registry
    assert_still_serving(url, registry)
