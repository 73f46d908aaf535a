"""The Remarkety Coupons bridge: onetag answers the Discounts endpoint Remarkety calls to
create a personalized coupon, and has the store create it through its coupon webhook.

The contract, from Remarkety's side ("Integrating custom platforms with Remarkety", Coupons
API): the store implements the Discounts endpoint of Remarkety's Swagger file, gives Remarkety
the REST API base URL and an API key, and Remarkety passes the key in the query string as
``remarkety_api_key``. That Swagger file is not public text we could find; its shape here is
the one Remarkety's own custom-platform connector implements (remarkety/nopcommerce-plugin,
``RemarketyWebApiController``, region "/discounts"): ``POST {base}/discounts`` with ``code``,
``templateId``, optional ``expiration`` and ``email``, answered ``{"is_success": bool,
"error_message": str}``. docs/coupons.md says what is assumed beyond that.

So onetag's base URL for a site is ``{public_url}/remarkety/{site_id}`` and it serves
``POST /remarkety/{site_id}/discounts``. The parameters may come in the query string (as that
connector binds them), a JSON object or a form body. Every call, refused or not, is kept in
``coupon_calls`` (``onetag coupons``) and logged with its request id; no secret is in either.

The store's side (``CouponWebhook``): one POST of the normalised request as JSON, signed
(``X-Onetag-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>``) with an
``Idempotency-Key`` stable across Remarkety's retries of the same request, bounded as a
whole by ``[sites.coupons] timeout_s``: a store that is down, slow, refuses or answers
garbage gets Remarkety a clear error in its format, never a hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from . import logs
from .admin.auth import client_address, shared_throttle
from .events import echo, email_problem
from .store.base import StoreUnavailable

log = logging.getLogger("onetag.coupons")

PATH = "/remarkety/{site_id}/discounts"
KEY_PARAM = "remarkety_api_key"
SIGNATURE_HEADER = "X-Onetag-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_TOLERANCE_S = 300  # what a store should accept between t= and its clock

# Bounds, checked before any work: a coupon request is a handful of short fields.
MAX_BODY_BYTES = 16 * 1024
MAX_QUERY_BYTES = 8 * 1024
MAX_FIELDS = 50  # query and form parameters, each
MAX_CODE = 100
MAX_EMAIL = 254
MAX_STORE_ANSWER = 64 * 1024  # bytes of the webhook's answer read; more is garbage
MAX_STORE_MESSAGE = 300  # characters of the store's error_message passed on
RECORD_TIMEOUT_S = 2.0  # the call log's write; the answer does not wait longer for it
# Calls without the right key are anyone's: each would cost a writer transaction, a row and
# a warning line. At most this many a minute per site are kept and logged (enough to see a
# misconfigured key); the rest are only answered.
UNAUTHORIZED_KEPT_PER_MINUTE = 20

CODE_RE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_CODE)  # printable ASCII, no spaces
TEMPLATE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
EXPIRATION_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?"
                           r"(?:Z|[+-]\d{2}:?\d{2})?)?")
IDEMPOTENCY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
# Remarkety's name for each field (templateId as its connector has it), and our own.
FIELDS = {"code": "code", "templateId": "template_id", "template_id": "template_id",
          "expiration": "expiration", "email": "email"}


class Invalid(Exception):
    """A request refused before the store is asked: its status and the field it names."""

    def __init__(self, status: int, field: str, problem: str, result: str = "invalid",
                 retry_after_s: int | None = None):
        super().__init__(f"{field}: {problem}")
        self.status, self.field, self.problem, self.result = status, field, problem, result
        self.retry_after_s = retry_after_s  # a 429's Retry-After


@dataclass(frozen=True)
class CouponRequest:
    """What Remarkety asked for, normalised: what the store's webhook receives."""

    code: str
    template_id: str
    expiration: str | None = None  # "YYYY-MM-DD", or a UTC time "YYYY-MM-DDTHH:MM:SSZ"
    email: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "template_id": self.template_id,
                "expiration": self.expiration, "email": self.email}


# Reading Remarkety's request ------------------------------------------------------------


def query_pairs(query: bytes) -> list[tuple[str, str]]:
    """The query string's parameters, within bounds (``Invalid``: 414 too long, 400 unreadable)."""
    if len(query) > MAX_QUERY_BYTES:
        raise Invalid(414, "query", f"is {len(query)} bytes; the limit is {MAX_QUERY_BYTES}")
    return _pairs(query, "query")


def _pairs(data: bytes, where: str) -> list[tuple[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(400, where, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS,
                         errors="strict")
    except UnicodeDecodeError:
        raise Invalid(400, where, "has a %-escape that is not valid UTF-8") from None
    except ValueError:
        raise Invalid(400, where, f"has more than {MAX_FIELDS} parameters") from None


def parse_request(query: list[tuple[str, str]], body: bytes, content_type: str) -> CouponRequest:
    """Remarkety's parameters from the query string and the body (a JSON object or a form),
    validated; ``Invalid`` naming the field otherwise. A field given more than once (the
    query and the body, or twice in one) must mean the same once normalised."""
    given: dict[str, list[tuple[str, Any]]] = {}  # our name: [(the name it came under, value)]
    for name, value in query:
        if name in FIELDS:
            given.setdefault(FIELDS[name], []).append((name, value))
    media = content_type.split(";", 1)[0].strip().lower()
    if body.strip():
        if media == "application/x-www-form-urlencoded":
            pairs = _pairs(body, "body")
        elif media in ("application/json", "") or media.endswith("+json"):
            pairs = list(_json_object(body).items())
        else:
            raise Invalid(415, "content-type", "must be application/json or "
                                               "application/x-www-form-urlencoded")
        for name, value in pairs:  # Remarkety may send more than we read: not ours to refuse
            if name in FIELDS:
                given.setdefault(FIELDS[name], []).append((name, value))

    def one(ours: str, check: Any, default_name: str) -> Any:
        found = given.get(ours) or [(default_name, None)]
        values = [check(value, name) for name, value in found]
        if any(value != values[0] for value in values):
            raise Invalid(400, found[0][0], "is given more than once with different values")
        return values[0]

    return CouponRequest(code=one("code", _code, "code"),
                         template_id=one("template_id", _template, "templateId"),
                         expiration=one("expiration", _expiration, "expiration"),
                         email=one("email", _email, "email"))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except UnicodeDecodeError as exc:
        raise Invalid(400, "body", f"is not valid UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise Invalid(400, "body", "nests too deep") from None
    except ValueError as exc:  # JSONDecodeError, and integers past the digit limit
        raise Invalid(400, "body", f"is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise Invalid(400, "body", f"must be a JSON object, not {type(value).__name__}")
    return value


def _text(value: Any, field: str) -> str | None:
    """A string field: absent, null and "" are None; anything but a string is refused."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(400, field, f"must be a string, not {_kind(value)}")
    value = value.strip()
    if not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(400, field, "is not valid Unicode (a lone surrogate)") from None
    return value


def _kind(value: Any) -> str:
    return {bool: "true/false", dict: "an object", list: "a list"}.get(type(value),
                                                                         type(value).__name__)


def _code(value: Any, field: str) -> str:
    code = _text(value, field)
    if code is None:
        raise Invalid(400, field, "is required: the coupon code to create")
    if not CODE_RE.fullmatch(code):
        raise Invalid(400, field, f"must be 1-{MAX_CODE} printable ASCII characters without "
                                  "spaces")
    return code


def _template(value: Any, field: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 10 ** 18:
            raise Invalid(400, field, "must be a template id from 0 to 10^18")
        return str(value)
    template = _text(value, field)
    if template is None:
        raise Invalid(400, field, "is required: the store's template discount to copy")
    if not TEMPLATE_RE.fullmatch(template):
        raise Invalid(400, field, "must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return template


def _expiration(value: Any, field: str) -> str | None:
    text = _text(value, field)
    if text is None:
        return None
    if len(text) > 40 or not EXPIRATION_RE.fullmatch(text):
        raise Invalid(400, field, "must be an ISO 8601 date or date-time like 2026-12-31 or "
                                  "2026-12-31T23:59:59Z")
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError as exc:
        raise Invalid(400, field, f"is not a real date ({exc})") from None
    if len(text) == 10:
        return when.date().isoformat()
    if when.tzinfo is None:  # a time without a zone is read as UTC (docs/coupons.md)
        when = when.replace(tzinfo=timezone.utc)
    try:
        return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError) as exc:  # 0001-01-01T00:00+01:00 has no UTC time
        raise Invalid(400, field, f"is out of range ({exc})") from None


def _email(value: Any, field: str) -> str | None:
    email = _text(value, field)
    if email is None:
        return None
    if len(email) > MAX_EMAIL or email_problem(email):
        raise Invalid(400, field, "must be one email address like jim@example.com, with no "
                                  "control or format character")
    return email


def idempotency_key(site_id: str, request: CouponRequest, given: str | None) -> str:
    """The caller's ``Idempotency-Key`` when it sends a well-formed one; else a hash of the
    site and the normalised request, so Remarkety's retry of the same request (same code:
    one coupon) gets the same key however its parameters were sent."""
    if given and IDEMPOTENCY_RE.fullmatch(given):
        return given
    canonical = json.dumps([site_id, request.code, request.template_id, request.expiration,
                            request.email], separators=(",", ":"), ensure_ascii=False)
    return "onetag-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:40]


# Signing (the store verifies; docs/coupons.md has the same in a snippet) ---------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Onetag-Signature`` value: HMAC-SHA256 over ``"<timestamp>." + body``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body,
                   hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float | None = None,
           tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """What a store does with the header: the same HMAC, compared in constant time, and a
    timestamp within ``tolerance_s`` of its clock (a replayed old request fails)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected.encode(), parts.get("v1", "").encode())  # bytes: any text


# The store's webhook --------------------------------------------------------------------


@dataclass(frozen=True)
class StoreAnswer:
    """What became of one webhook call, and what Remarkety is told."""

    status: int  # to Remarkety
    result: str  # created, refused, or store_down/_timeout/_auth/_error/_garbage (docs/coupons.md)
    message: str | None = None  # Remarkety's error_message
    store_status: int | None = None
    error: str | None = None  # for the operator (call log, log line)
    retry_after_s: int | None = None  # a 429's Retry-After

    @property
    def ok(self) -> bool:
        return self.result == "created"


def public_url(url: str) -> str:
    """A URL as logs and errors may show it: scheme, host and path (a query may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


class CouponWebhook:
    """One signed POST to the store's ``webhook_url``, bounded as a whole by ``timeout_s``."""

    def __init__(self, config: Any, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.transport = transport

    def payload(self, site_id: str, request: CouponRequest, key: str, request_id: str) -> bytes:
        return json.dumps({"type": "coupon.create", "source": "remarkety", "site_id": site_id,
                           "idempotency_key": key, "request_id": request_id,
                           "coupon": request.as_dict()},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    async def create(self, site_id: str, request: CouponRequest, key: str,
                     request_id: str) -> StoreAnswer:
        config = self.config
        body = self.payload(site_id, request, key, request_id)
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   IDEMPOTENCY_HEADER: key, logs.REQUEST_ID_HEADER: request_id,
                   SIGNATURE_HEADER: signature(config.webhook_secret or "", int(time.time()), body),
                   "User-Agent": "onetag-coupons"}
        timeout = config.timeout_s
        where = public_url(config.webhook_url)
        try:
            async with asyncio.timeout(timeout):  # connect, send, every byte of the answer
                async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False,
                                             transport=self.transport) as client:
                    async with client.stream("POST", config.webhook_url, content=body,
                                             headers=headers) as response:
                        data = await _read_limited(response)
                        status = response.status_code
        except (TimeoutError, httpx.TimeoutException):
            return StoreAnswer(504, "store_timeout", f"the store did not answer within "
                               f"{timeout:g} s; the coupon may not exist",
                               error=f"no answer from {where} within {timeout:g} s")
        except httpx.HTTPError as exc:
            return StoreAnswer(502, "store_down", "the store could not be reached to create "
                               "the coupon; try again later",
                               error=f"{type(exc).__name__} from {where}: {str(exc)[:200]}")
        return _judge(status, data, where)


async def _read_limited(response: httpx.Response) -> bytes | None:
    """The answer's body, or None when it is over ``MAX_STORE_ANSWER`` bytes."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_STORE_ANSWER:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _judge(status: int, data: bytes | None, where: str) -> StoreAnswer:
    """The store's answer in Remarkety's terms (docs/coupons.md: the contract)."""
    answer = _store_json(data)
    message = _store_message(answer)
    if 200 <= status < 300:
        if answer is None or not isinstance(answer.get("is_success"), bool):
            return StoreAnswer(502, "store_garbage", "the store's answer could not be read",
                               status, f"HTTP {status} from {where} without a JSON "
                               f"{{\"is_success\": true|false}} object: {_preview(data)}")
        if answer["is_success"]:
            return StoreAnswer(200, "created", None, status)
        text = message or "the store did not create the coupon"
        return StoreAnswer(422, "refused", text, status, f"the store refused: {text}")
    if status in (401, 403):
        return StoreAnswer(502, "store_auth", "the store refused onetag's request (a "
                           "configuration problem between onetag and the store)", status,
                           f"HTTP {status} from {where}: the store did not accept the "
                           "signature; check [sites.coupons] webhook_secret on both sides")
    if 400 <= status < 500:
        text = message or f"the store refused the coupon (HTTP {status})"
        return StoreAnswer(422, "refused", text, status, f"HTTP {status} from {where}: {text}")
    return StoreAnswer(502, "store_error", f"the store failed to create the coupon (HTTP "
                       f"{status}); try again later", status,
                       f"HTTP {status} from {where}: {_preview(data)}")


def _store_json(data: bytes | None) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _store_message(answer: dict[str, Any] | None) -> str | None:
    """The store's ``error_message`` (or ``error``), one printable line, bounded."""
    if answer is None:
        return None
    for name in ("error_message", "error", "message"):
        value = answer.get(name)
        if isinstance(value, str) and value.strip():
            text = "".join(c if c.isprintable() else " " for c in value).strip()
            return text[:MAX_STORE_MESSAGE]
    return None


def _preview(data: bytes | None) -> str:
    if data is None:
        return f"an answer over {MAX_STORE_ANSWER} bytes"
    text = data[:200].decode("utf-8", "replace")
    return repr(text) if text else "an empty body"


# The endpoint ---------------------------------------------------------------------------


def remarkety_answer(status: int, message: str | None, request_id: str,
                     retry_after_s: int | None = None) -> JSONResponse:
    """Remarkety's format: ``{"is_success": true}`` or ``{"is_success": false,
    "error_message": ...}``, with the request id for the operator's ``onetag coupons``."""
    body: dict[str, Any] = {"is_success": status == 200}
    if message is not None:
        body["error_message"] = message
    headers = {logs.REQUEST_ID_HEADER: request_id, "Cache-Control": "no-store"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


class Coupons:
    """``POST /remarkety/{site_id}/discounts``, bound to the app's settings and store."""

    def __init__(self, settings: Any, store: Any,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.store = store
        self.transport = transport  # tests only: where the webhook's requests go
        self.body_timeout_s = settings.server.body_timeout_s
        self._unauthorized: dict[str, tuple[float, int]] = {}  # site: (window start, kept)
        self.guesses = shared_throttle(store, "coupon_key")  # wrong keys, per site, address

    async def discounts(self, request: Request) -> Response:
        rid = logs.request_id(request.headers.get("x-request-id"))
        logs.REQUEST_ID.set(rid)
        started = time.monotonic()
        site_id = request.path_params["site_id"]
        site = self.settings.sites.get(site_id)
        config = getattr(site, "coupons", None)
        if config is None:  # nothing recorded: there is no site to keep it for
            return remarkety_answer(404, f"site_id: no Remarkety coupons bridge for site "
                                         f"{echo(site_id)} here ([sites.coupons] is not set)", rid)
        call: dict[str, Any] = {"created_ms": int(time.time() * 1000), "site_id": site_id,
                                "request_id": rid}
        try:
            answer = await self._call(request, site_id, config, call, rid)
        except ClientDisconnect:
            answer = StoreAnswer(499, "disconnected", None, error="Remarkety hung up before "
                                 "its request was read")
        except Exception as exc:  # a bug: still Remarkety's format, and kept
            log.exception("the coupons bridge failed a request")
            answer = StoreAnswer(500, "error", "onetag failed to handle the request",
                                 error=f"{type(exc).__name__}: {str(exc)[:200]}")
        call.update(status=answer.status, result=answer.result, store_status=answer.store_status,
                    error=answer.error, duration_ms=int((time.monotonic() - started) * 1000))
        if answer.result == "unauthorized" and not self._keep_unauthorized(site_id):
            return remarkety_answer(answer.status, answer.message, rid, answer.retry_after_s)
        await self._record(call)
        level = logging.INFO if answer.ok else logging.WARNING
        log.log(level, "coupon call for site %s: %s (%d)%s", site_id, answer.result,
                answer.status, f": {answer.error}" if answer.error else "",
                extra={"site_id": site_id, "result": answer.result, "status": answer.status,
                       "store_status": answer.store_status, "duration_ms": call["duration_ms"],
                       "idempotency_key": call.get("idempotency_key")})
        return remarkety_answer(answer.status, answer.message, rid, answer.retry_after_s)

    async def _call(self, request: Request, site_id: str, config: Any, call: dict[str, Any],
                    rid: str) -> StoreAnswer:
        """Key, bounds, parameters, then the store: a refusal before the store is
        ``Invalid``, answered here, and the webhook is never called for it."""
        try:
            query = query_pairs(request.scope.get("query_string", b""))
            await self._authorise(query, config, client_address(request), site_id)
            body = await self._body(request)
            coupon = parse_request(query, body, request.headers.get("content-type", ""))
        except Invalid as exc:
            return StoreAnswer(exc.status, exc.result, f"{exc.field}: {exc.problem}",
                               error=f"{exc.field}: {exc.problem}",
                               retry_after_s=exc.retry_after_s)
        key = idempotency_key(site_id, coupon, request.headers.get(IDEMPOTENCY_HEADER))
        call.update(coupon.as_dict(), idempotency_key=key)
        return await CouponWebhook(config, self.transport).create(site_id, coupon, key, rid)

    async def _authorise(self, query: list[tuple[str, str]], config: Any, address: str,
                         site_id: str) -> None:
        """``remarkety_api_key`` from the query string, as the vendor doc says Remarkety
        sends it, compared in constant time with the site's; never logged or kept. Wrong
        keys are bounded per site and client address as the console's login is
        (``guesses``, every node's counted together): each is answered 0.5 s late, and an address with 5
        within a minute gets 429 (its right key too) until the window has passed."""
        given = [value for name, value in query if name == KEY_PARAM]
        if not given or not given[0]:
            raise Invalid(401, KEY_PARAM, "is required in the query string (the API key "
                                          "given to Remarkety with the base URL)", "unauthorized")
        guess = await self.guesses.check(address, given[0] if len(given) == 1 else None,
                                         config.remarkety_api_key, site_id)
        if guess.wait:
            raise Invalid(429, KEY_PARAM, f"too many wrong keys from your address; try again "
                                          f"in {guess.wait} s", "unauthorized",
                          retry_after_s=guess.wait)
        if not guess.right:
            raise Invalid(403, KEY_PARAM, "is not this site's key", "unauthorized")

    async def _body(self, request: Request) -> bytes:
        """The body within ``MAX_BODY_BYTES`` and ``[server] body_timeout_s``."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise Invalid(413, "body", f"is {declared} bytes; the limit is {MAX_BODY_BYTES}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise Invalid(413, "body", f"is over the limit of {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise Invalid(408, "body", f"was not received within {self.body_timeout_s:g} s") from None
        return b"".join(chunks)

    def _keep_unauthorized(self, site_id: str) -> bool:
        """Whether this minute's calls without the right key for ``site_id`` (a configured
        site: the dict stays small) are still under ``UNAUTHORIZED_KEPT_PER_MINUTE``."""
        now = time.monotonic()
        start, kept = self._unauthorized.get(site_id, (now, 0))
        if now - start >= 60:
            start, kept = now, 0
        self._unauthorized[site_id] = (start, kept + 1)
        if kept == UNAUTHORIZED_KEPT_PER_MINUTE:
            log.warning("more than %d coupon calls without the right key for site %s this "
                        "minute: the rest of the minute's are answered, not kept or logged",
                        UNAUTHORIZED_KEPT_PER_MINUTE, site_id, extra={"site_id": site_id})
        return kept < UNAUTHORIZED_KEPT_PER_MINUTE

    async def _record(self, call: dict[str, Any]) -> None:
        """Keep the call through the store's writer; a store that can't (or not within
        ``RECORD_TIMEOUT_S``) costs the row and an error line, never Remarkety's answer."""
        try:
            await asyncio.wait_for(self.store.record_coupon_call(call), RECORD_TIMEOUT_S)
        except (StoreUnavailable, asyncio.TimeoutError, NotImplementedError) as exc:
            log.error("a coupon call was not kept in coupon_calls (%s: %s)",
                      type(exc).__name__, exc, extra={"site_id": call["site_id"]})
