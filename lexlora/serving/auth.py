"""Optional bearer-token auth of `lexlora serve` (`--api-key`, or env `LEXLORA_API_KEY`), enforced
before the app parses anything, on every route but the open ones (`/health`, so that load balancers
and orchestrators can probe without the key)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable

from lexlora.errors import ConfigError

ENV_VAR = "LEXLORA_API_KEY"


def api_key_from(settings_value: str | None) -> str | None:
    """The API key to require: `settings_value` (from `--api-key`), else env `LEXLORA_API_KEY`, else
    None (no auth). Surrounding whitespace is dropped (a key read from a file keeps its newline); an
    empty key is refused rather than read as "no auth", and so is one that cannot travel in an HTTP
    header (not printable ASCII)."""
    source, value = "--api-key", settings_value
    if value is None:
        source, value = ENV_VAR, os.environ.get(ENV_VAR)
        if value is None:
            return None
    key = value.strip()
    if not key:
        raise ConfigError(f"{source} is empty: give a key (--api-key KEY or {ENV_VAR}=KEY), or leave both unset "
                          "for no auth")
    if not (key.isascii() and key.isprintable()):
        raise ConfigError(f"{source} must be printable ASCII: clients send it in an HTTP header")
    return key


class BearerAuth:
    """ASGI middleware: every HTTP request whose path is not in `open_paths` must carry
    `Authorization: Bearer <api_key>`, else it is answered 401 with `WWW-Authenticate: Bearer` and
    a JSON body: OpenAI's error shape under `/v1/` (so OpenAI clients raise their
    AuthenticationError), `{"detail": ...}` elsewhere as on the other routes. The key is compared
    in constant time and never echoed. A websocket without the key is closed before it opens."""

    def __init__(self, app, api_key: str, open_paths: Iterable[str] = ("/health",)):
        if not api_key:
            raise ConfigError("BearerAuth needs a non-empty api_key")
        self.app, self.key, self.open_paths = app, api_key.encode(), frozenset(open_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        problem = self.problem(scope.get("headers") or ())
        if problem is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": problem})
        await _reply(send, scope["path"], problem)

    def problem(self, headers) -> str | None:
        """What is wrong with a request's credentials, or None when they are right."""
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if not values:
            return "no Authorization header: send 'Authorization: Bearer <key>'"
        if len(values) > 1:
            return "more than one Authorization header: send one, 'Authorization: Bearer <key>'"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is not repeated: a bare key would land there
            return "the Authorization header is not of the Bearer scheme: send 'Authorization: Bearer <key>'"
        token = token.strip()
        if not token:
            return "the Authorization header has no key after 'Bearer'"
        if not secrets.compare_digest(token, self.key):
            return "the API key in the Authorization header is wrong"
        return None


async def _reply(send, path: str, message: str) -> None:
    if path == "/v1" or path.startswith("/v1/"):
        payload = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}}
    else:
        payload = {"detail": message}
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start", "status": 401,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")],
    })
    await send({"type": "http.response.body", "body": body})
