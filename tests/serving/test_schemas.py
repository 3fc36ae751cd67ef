"""Request parsing as a client meets it: every malformed, oversized or path-like request gets its
own 4xx with a readable detail, and the server keeps serving. (parse_generate_request itself is
property-tested in tests/test_properties.py.)"""

import json

import pytest

from tests.serving import served
from tests.serving.served import assert_still_serving, call

adapters, server = served.adapters, served.server


def test_no_client_chosen_paths(server, adapters, tmp_path):
    url, _ = server
    root, spare, registry = adapters
    (root / "outside").symlink_to(spare / "extra", target_is_directory=True)
    for name in ["../plain", "a/b", str(root / "desc"), ".", "..", "", ".hidden", "outside"]:
        status, body = call(f"{url}/adapters", "POST", {"name": name})
        assert status in (400, 422), name
        assert isinstance(body["detail"], str) and body["detail"], name
    assert "outside" not in registry and len(registry) == 3
    assert_still_serving(url, registry)

BAD_REQUESTS = [
    # (body or raw bytes, expected statuses, text expected in the detail)
    ({"adapter": "nope", "inputs": ["a"]}, {404}, "nope"),
    (b'{"adapter": "desc", "inputs": [', {422}, "JSON"),
    (b"", {422}, "body"),
    ({"adapter": "desc", "inputs": "a.py"}, {422}, "inputs"),
    ({"adapter": 3, "inputs": ["a.py"]}, {422}, "adapter"),
    ({"adapter": "desc", "inputs": [1]}, {422}, "inputs"),
    ({"adapter": "desc", "inputs": [{"filename": 1}]}, {422}, "inputs"),
    ({"adapter": "desc", "inputs": ["a"], "max_new_tokens": "many"}, {422}, "max_new_tokens"),
    ({"adapter": "desc", "inputs": ["a"], "max_new_tokens": 10**6}, {422}, "max_new_tokens"),
    ({"adapter": "desc", "inputs": ["a"], "typo": 1}, {422}, "typo"),
    ({"inputs": ["a"]}, {422}, "adapter"),
    ({"adapter": "desc", "inputs": []}, {422}, "inputs is empty"),
    ({"adapter": "desc", "inputs": ["a"] * 5}, {413}, "5 inputs; at most 4 per request"),
    ({"adapter": "desc", "inputs": ["a" * 51]}, {413}, "input 0: 51 characters; at most 50 per string"),
    ({"adapter": "files", "inputs": [{"file": "x" * 51, "directory": "d"}]}, {413}, "at most 50"),
    ({"adapter": "files", "inputs": [{"file": "main.c"}]}, {422}, "'directory'"),
    ({"adapter": "files", "inputs": ["main.c"]}, {422}, "record"),
    # Text a tokenizer cannot take (JSON allows a lone surrogate escape).
    (b'{"adapter": "desc", "inputs": ["a\\ud800b"]}', {422}, "input 0: not valid text"),
    # Names, never paths: refused before any lookup.
    ({"adapter": "../desc", "inputs": ["a"]}, {422}, "invalid adapter name '../desc'"),
    ({"adapter": "a/b", "inputs": ["a"]}, {422}, "invalid adapter name"),
    ({"adapter": "/etc/passwd", "inputs": ["a"]}, {422}, "invalid adapter name"),
    ({"adapter": "desc", "inputs": ["a"], "pad": "x" * 3000}, {413}, "at most 2000"),
    (b"[1, 2]", {422}, "must be a JSON object"),
    (b"null", {422}, "got null"),
    (b"[" * 3000 + b"]" * 3000, {413}, "at most 2000"),
    (b"[" * 1500, {422}, "nested too deeply"),
    (b'{"adapter": "desc", "inputs": ["\xff"]}', {422}, "not UTF-8"),
    (b"\x00\x01", {422}, "not valid JSON"),
]

@pytest.mark.parametrize("body, statuses, text", BAD_REQUESTS)
def test_bad_request_fails_alone_and_the_server_keeps_serving(server, adapters, body, statuses, text):
    url, _ = server
    if isinstance(body, bytes):
        status, reply = call(f"{url}/generate", "POST", raw=body)
    else:
        status, reply = call(f"{url}/generate", "POST", body)
    assert status in statuses
    assert isinstance(reply["detail"], str) and text in reply["detail"]
    assert_still_serving(url, adapters[2])

def test_form_encoded_body_gets_a_hint(server, adapters):
    url, _ = server
    raw = json.dumps({"adapter": "desc", "inputs": ["a"]}).encode()
    status, reply = call(f"{url}/generate", "POST", raw=raw, content_type="application/x-www-form-urlencoded")
    assert status == 422 and "Content-Type: application/json" in reply["detail"]
