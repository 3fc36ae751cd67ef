"""`BearerAuth` around a tiny Starlette app (starlette's TestClient, in-process) and `api_key_from`:
which requests pass, and the 401 each of the others gets, in OpenAI's shape under /v1/."""

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from lexlora.errors import ConfigError
from lexlora.serving.auth import BearerAuth, api_key_from

KEY = "sk-test-0123456789"


async def ok(request):
    return JSONResponse({"ok": True, "path": request.url.path})


async def echo(ws):
    await ws.accept()
    await ws.send_text("hello")
    await ws.close()


@pytest.fixture
def client():
    app = Starlette(routes=[Route("/health", ok), Route("/generate", ok, methods=["POST"]),
                            Route("/metrics", ok), Route("/v1/models", ok), Route("/v1/completions", ok, methods=["POST"]),
                            WebSocketRoute("/ws", echo)])
    with TestClient(BearerAuth(app, api_key=KEY)) as c:
        yield c


def bearer(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def assert_401(response, openai_shape, says):
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if openai_shape:
        assert set(body) == {"error"}
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert error["code"] == "invalid_api_key"
        message = error["message"]
    else:
        assert set(body) == {"detail"}
        message = body["detail"]
    assert says in message and KEY not in message
    return message


def test_the_right_key_passes(client):
    assert client.get("/v1/models", headers=bearer()).json() == {"ok": True, "path": "/v1/models"}
    assert client.post("/generate", headers=bearer(), json={"adapter": "a"}).status_code == 200
    assert client.get("/metrics", headers={"authorization": f"bearer {KEY}"}).status_code == 200  # any case


def test_health_is_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/health", headers=bearer("wrong")).status_code == 200


@pytest.mark.parametrize("path, openai_shape", [("/v1/models", True), ("/metrics", False), ("/generate", False)])
def test_no_header(client, path, openai_shape):
    response = client.get(path) if path != "/generate" else client.post(path, json={})
    assert_401(response, openai_shape, "no Authorization header")


@pytest.mark.parametrize("path, openai_shape", [("/v1/models", True), ("/metrics", False)])
def test_wrong_scheme(client, path, openai_shape):
    message = assert_401(client.get(path, headers={"Authorization": f"Basic {KEY}"}), openai_shape, "Bearer scheme")
    assert "Basic" not in message
    # a bare key (no scheme) is not echoed either: it would sit where the scheme goes
    assert_401(client.get(path, headers={"Authorization": KEY}), openai_shape, "Bearer scheme")


@pytest.mark.parametrize("path, openai_shape", [("/v1/completions", True), ("/generate", False)])
def test_wrong_or_empty_key(client, path, openai_shape):
    for key in ("wrong", KEY + "x", KEY[:-1], "ключ"):
        headers = {"Authorization": f"Bearer {key}".encode()}
        message = assert_401(client.post(path, headers=headers, json={}), openai_shape, "key")
        assert "wrong" in message
    assert_401(client.post(path, headers={"Authorization": "Bearer "}, json={}), openai_shape, "no key")


def test_two_authorization_headers_are_refused(client):
    headers = [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong")]
    assert_401(client.get("/metrics", headers=headers), False, "more than one")


def test_unknown_paths_are_refused_before_routing(client):
    """No key, no 404: an unauthenticated client learns nothing about which routes exist."""
    assert_401(client.get("/nope"), False, "no Authorization header")
    assert client.get("/nope", headers=bearer()).status_code == 404


def test_websockets_need_the_key_too(client):
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
        pass
    assert refused.value.code == 1008
    with client.websocket_connect("/ws", headers=bearer()) as ws:
        assert ws.receive_text() == "hello"


def test_other_open_paths():
    app = Starlette(routes=[Route("/health", ok), Route("/metrics", ok)])
    with TestClient(BearerAuth(app, api_key=KEY, open_paths=("/health", "/metrics"))) as c:
        assert c.get("/metrics").status_code == 200
    with pytest.raises(ConfigError):
        BearerAuth(app, api_key="")


def test_api_key_from(monkeypatch):
    monkeypatch.delenv("LEXLORA_API_KEY", raising=False)
    assert api_key_from(None) is None
    assert api_key_from("abc") == "abc"
    monkeypatch.setenv("LEXLORA_API_KEY", "from-env\n")
    assert api_key_from(None) == "from-env"  # a key read from a file loses its newline
    assert api_key_from("flag") == "flag"  # the flag wins over the env
    with pytest.raises(ConfigError, match="--api-key is empty.*LEXLORA_API_KEY"):
        api_key_from("")
    monkeypatch.setenv("LEXLORA_API_KEY", "  ")
    with pytest.raises(ConfigError, match="LEXLORA_API_KEY is empty.*--api-key"):
        api_key_from(None)
    with pytest.raises(ConfigError, match="printable ASCII"):
        api_key_from("ключ")
