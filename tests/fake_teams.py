"""A fake Bot Framework on 127.0.0.1: the channel's OpenID metadata and signing keys, a token endpoint, and the Bot
Connector REST API that Teams serves at an activity's serviceUrl.

`with FakeTeams() as bf:` (it runs in a thread of its own: botbuilder fetches the signing keys, and the bot its token,
with blocking calls, which would wait for ever on a server in the test's own event loop), then `bf.settings()` (the
adapters.teams section pointing at it), `bf.token()` (a channel token signed with the fake's key), `bf.message(...)`
and `bf.click(...)` (activities as Teams posts them), `bf.calls` (each connector call, recorded),
`bf.fail(method, status, headers)`, `bf.connector_delay`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

APP_ID = "00000000-0000-0000-0000-00000000b07a"
APP_PASSWORD = "fake-app-password"
TENANT = "72f988bf-0000-0000-0000-000000000001"
CHANNEL = "19:ops0123456789abcdef@thread.tacv2"
BOT = {"id": f"28:{APP_ID}", "name": "chatops"}
ISSUER = "https://api.botframework.test"
_CONNECTOR = re.compile(r"/v3/conversations(?:/(?P<conversation>[^/]+)/activities(?:/(?P<activity>[^/]+))?)?/?$")


@dataclass
class Call:
    method: str  # send, reply, update, create
    conversation: str
    activity_id: str | None
    body: dict[str, Any]
    authorization: str
    status: int = 200
    answered: str | None = None  # the id of the activity or conversation it made


@dataclass
class FakeTeams:
    app_id: str = APP_ID
    calls: list[Call] = field(default_factory=list)
    tokens_issued: int = 0
    token_delay: float = 0.0  # seconds the token endpoint takes to answer
    keys_delay: float = 0.0  # seconds the signing keys take
    connector_delay: float = 0.0  # seconds each Bot Connector call takes to answer (after it was recorded)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "fake-key-1"
        self._ids = itertools.count(1000)
        self._failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._lock = threading.Lock()
        self.port = 0
        # the channels the signing key is endorsed for (Microsoft's keys sign for Direct Line and Web Chat too)
        self.endorsements = ["msteams"]

    # -- what a test uses --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        return f"{self.url}/teams/"

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {"app_id": self.app_id, "app_password": APP_PASSWORD, "service_url": self.service_url,
                "openid_metadata_url": f"{self.url}/openid", "token_issuer": ISSUER,
                "login_url": f"{self.url}/botframework.test", "oauth_scope": "https://api.botframework.test",
                **overrides}

    def yaml(self, **overrides: Any) -> str:
        """The adapters.teams section, as app.yaml says it."""
        return "adapters:\n  teams: " + json.dumps(self.settings(**overrides)) + "\n"

    def token(self, *, key: rsa.RSAPrivateKey | None = None, audience: str | None = None, issuer: str = ISSUER,
              service_url: str | None = None, expires_in: float | None = 3600, kid: str | None = None) -> str:
        """A Bearer token as the Bot Framework channel signs it (with the fake's key unless `key`; without an expiry
        for `expires_in=None`; its header naming `kid`, else the fake's key id)."""
        now = int(time.time())
        claims = {"iss": issuer, "aud": audience or self.app_id, "serviceurl": service_url or self.service_url,
                  "nbf": now - 10, **({"exp": now + int(expires_in)} if expires_in is not None else {})}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid})

    def headers(self, **token: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**token)}", "Content-Type": "application/json"}

    def message(self, text: str, *, user: str = "29:1alice", aad: str | None = None, conversation: str = CHANNEL,
                personal: bool = False, reply_to: str | None = None, value: Any = None) -> dict[str, Any]:
        """A message activity as Teams posts it: in a channel (the mention of the bot in the text) or 1:1."""
        conv: dict[str, Any] = {"id": conversation, "conversationType": "personal" if personal else "channel",
                                "tenantId": TENANT}
        if not personal:
            conv["isGroup"] = True
        activity: dict[str, Any] = {
            "type": "message", "id": str(next(self._ids)), "timestamp": "2026-11-24T04:00:00.000Z",
            "serviceUrl": self.service_url, "channelId": "msteams",
            "from": {"id": user, "name": "Alice", "aadObjectId": aad or str(uuid.uuid4())},
            "conversation": conv, "recipient": BOT, "text": text, "textFormat": "plain",
            "channelData": {"tenant": {"id": TENANT}},
        }
        if not personal and text:
            activity["text"] = f"<at>chatops</at> {text}"
            activity["entities"] = [{"type": "mention", "text": "<at>chatops</at>", "mentioned": BOT}]
        if reply_to is not None:
            activity["replyToId"] = reply_to
        if value is not None:
            activity["value"] = value
            activity["text"] = ""
            activity.pop("entities", None)
        return activity

    def click(self, value: str, card: str, *, conversation: str = CHANNEL, personal: bool = False,
              **kwargs: Any) -> dict[str, Any]:
        """An Action.Submit click on the card `card` (its activity id): a message with the button's data as value,
        in the card's thread (a channel's conversation id then names the thread's root: `;messageid=`)."""
        if not personal:
            conversation = f"{conversation};messageid={card}"
        return self.message("", reply_to=card, value={"chatops": value}, conversation=conversation,
                            personal=personal, **kwargs)

    def fail(self, method: str, status: int, headers: dict[str, str] | None = None, times: int = 1) -> None:
        """The next `times` calls of `method` (send, reply, update, create) answer `status`."""
        with self._lock:
            self._failures.setdefault(method, []).extend([(status, headers or {})] * times)

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.status < 300]

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls: {[(c.method, c.conversation) for c in self.calls]}")
            await asyncio.sleep(0.02)

    # -- the server, in a thread -------------------------------------------------------------------------------

    def __enter__(self) -> FakeTeams:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_get("/openid", self._openid)
            app.router.add_get("/keys", self._keys)
            app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
            app.router.add_route("*", "/teams/{tail:.*}", self._connector)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-teams", daemon=True)
        self._thread.start()
        started.wait(10)
        # botbuilder keeps each metadata URL's signing keys for a day, process-wide: a fake on the port an earlier
        # one had was checked against that one's key (same key id), and its first activity refused 401 (a CI run did)
        from botframework.connector.auth.jwt_token_extractor import JwtTokenExtractor

        JwtTokenExtractor.metadataCache.pop(f"{self.url}/openid", None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _openid(self, _request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{self.url}/keys",
                                  "id_token_signing_alg_values_supported": ["RS256"]})

    async def _keys(self, _request: web.Request) -> web.Response:
        await asyncio.sleep(self.keys_delay)
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": self.kid, "use": "sig", "endorsements": self.endorsements}]})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != self.app_id or form.get("client_secret") != APP_PASSWORD:
            return web.json_response({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client "
                                      "secret provided."}, status=401)
        await asyncio.sleep(self.token_delay)
        self.tokens_issued += 1
        return web.json_response({"token_type": "Bearer", "expires_in": 3599,
                                  "access_token": f"bot-token-{self.tokens_issued}"})

    async def _connector(self, request: web.Request) -> web.Response:
        match = _CONNECTOR.search(request.path)
        if match is None:
            return web.json_response({"error": {"code": "BadSyntax", "message": "no such route"}}, status=404)
        conversation, activity = match.group("conversation"), match.group("activity")
        if request.method == "POST" and conversation is None:
            method = "create"
        elif request.method == "POST":
            method = "reply" if activity else "send"
        elif request.method == "PUT" and activity:
            method = "update"
        else:
            return web.json_response({"error": {"code": "BadSyntax", "message": "no such method"}}, status=405)
        call = Call(method, conversation or "", activity, await request.json(),
                    request.headers.get("Authorization", ""))
        with self._lock:
            failures = self._failures.get(method)
            failure = failures.pop(0) if failures else None
        self.calls.append(call)
        await asyncio.sleep(self.connector_delay)
        if failure is not None:
            call.status, headers = failure
            return web.json_response({"error": {"code": "Failed", "message": f"fake failure {call.status}"}},
                                     status=call.status, headers=headers)
        if method == "create" and not _tenant_of(call.body):
            # Teams opens a chat only in a tenant it is told: Microsoft's Bot Connector answers 400 without one
            call.status = 400
            return web.json_response({"error": {"code": "BadArgument", "message": "Tenant id is required"}},
                                     status=400)
        if method == "create":
            member = (call.body.get("members") or [{}])[0].get("id", "")
            call.answered = f"a:1{member.replace(':', '')}"
            return web.json_response({"id": call.answered, "activityId": None}, status=201)
        if method == "update":
            return web.json_response({"id": activity})
        call.answered = str(next(self._ids))
        return web.json_response({"id": call.answered}, status=201)


def _tenant_of(parameters: dict[str, Any]) -> str | None:
    """The tenant of a create's ConversationParameters: `channelData.tenant.id`, or `tenantId` (its keys are taken
    in any case, as Microsoft's JSON binding takes them; botbuilder writes `tenantID`)."""
    tenant = ((parameters.get("channelData") or {}).get("tenant") or {}).get("id")
    return tenant or next((v for k, v in parameters.items() if k.lower() == "tenantid" and v), None)
