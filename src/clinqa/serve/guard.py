"""The request guard of the clinqa service: what stands between a request and a route.

- :class:`_Guard`, the outermost ASGI layer: size limits, path checks, security headers, and the one
  audit entry per ``/api`` request, written (fsynced) before the response starts;
- :class:`_AuditContext`, what that entry will say, filled in by the routes as they learn it
  (:func:`_ctx` gives a route its request's context), and :func:`write_audit`, which writes it;
- :func:`authenticated` (the API key dependency) and :func:`patient_for` (the patient id check and
  scope), used by the routes in :mod:`clinqa.serve.api_routes`;
- :class:`ApiError`, the error answer every layer raises.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import MutableHeaders

from clinqa.serve.audit import AuditLog
from clinqa.serve.auth import KeyRecord

if TYPE_CHECKING:
    from clinqa.serve.service import Service, _Patient

log = logging.getLogger("clinqa.serve")

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ROUTE_ACTION = re.compile(r"^/api/patients/[^/]*/(timeline|ask)/?$")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy", _CSP.encode()),
)
_OUTCOME_BY_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 503: "unavailable", 504: "timeout"}
_ERROR_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid_request",
    500: "error",
    503: "unavailable",
    504: "timeout",
}


# ============================================================================ errors


class ApiError(HTTPException):
    """An error answer: ``{"error": code, "message": text}`` with the status. A FastAPI HTTPException,
    so FastAPI re-raises it as is even from inside body parsing (the streamed-size check relies on it)."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: Optional[dict[str, str]] = None,
        outcome: Optional[str] = None,
        detail: str = "",
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error = error
        self.outcome = outcome
        self.audit_detail = detail or error


def _error_body(status: int, error: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": error, "message": message, "status": status, **extra}


@dataclass
class _AuditContext:
    """What one /api request will write to the audit log; handlers fill it in as they learn."""

    action: str
    started: float
    key_id: Optional[str] = None
    patient_id: Optional[str] = None
    question_hash: Optional[str] = None
    resource_ids: list[str] = field(default_factory=list)
    outcome: Optional[str] = None
    detail: str = ""


def _action_for(path: str) -> str:
    if path.rstrip("/") == "/api/patients":
        return "patients.list"
    if path.rstrip("/") == "/api/mcq":
        return "mcq"
    m = _ROUTE_ACTION.match(path)
    return m.group(1) if m else "api"


def _outcome_for(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if status in _OUTCOME_BY_STATUS:
        return _OUTCOME_BY_STATUS[status]
    return "bad_request" if 400 <= status < 500 else "error"


def _ctx(request: Request) -> _AuditContext:
    return request.scope["state"]["audit"]


async def write_audit(audit: AuditLog, ctx: _AuditContext, status: int) -> None:
    """Append the request's one audit entry; ``status`` is the response's, for the outcome unless a handler set it."""
    outcome = ctx.outcome or _outcome_for(status)
    detail = ctx.detail or ("" if outcome == "ok" else f"HTTP {status}")
    await asyncio.to_thread(
        audit.append,
        ctx.action,
        key_id=ctx.key_id,
        patient_id=ctx.patient_id,
        question_hash=ctx.question_hash,
        resource_ids=ctx.resource_ids,
        outcome=outcome,
        detail=detail,
    )


# ============================================================================ the guard (ASGI middleware)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "too_large", f"the request body is larger than {limit} bytes", detail="body too large")


class _Guard:
    """Outermost app layer: size limits, path checks, security headers, and the one audit entry per /api request
    written before the response starts."""

    def __init__(self, app: Any, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.service
        path: str = scope.get("path", "")
        audited = path == "/api" or path.startswith("/api/")
        ctx = _AuditContext(action=_action_for(path), started=time.perf_counter())
        scope.setdefault("state", {})["audit"] = ctx
        response_started = False
        swallow = False

        async def guarded_send(message: dict) -> None:
            nonlocal response_started, swallow
            if swallow:
                return
            if message["type"] == "http.response.start":
                response_started = True
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS:
                    if name.decode() not in headers:
                        headers.append(name.decode(), value.decode())
                if audited:
                    headers["cache-control"] = "no-store"
                    try:
                        await service.write_audit(ctx, message["status"])
                    except Exception as e:  # no audit entry, no answer
                        log.error("audit log write failed (%s): refusing the response", type(e).__name__)
                        swallow = True
                        await _send_json(
                            send,
                            500,
                            _error_body(
                                500, "audit_failed", "the audit log could not be written; nothing was returned"
                            ),
                        )
                        return
            await send(message)

        if audited and _suspicious_path(scope):
            ctx.detail = "encoded or dot-segment path"
            await _send_json(
                guarded_send,
                400,
                _error_body(
                    400,
                    "bad_path",
                    "path parameters must be plain FHIR ids (A-Z a-z 0-9 - .): no %-encoding, '/', '\\' or '..'",
                ),
            )
            return
        limit = service.config.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_json(guarded_send, 400, _error_body(400, "bad_request", "Content-Length is not a number"))
                return
            if int(length) > limit:
                ctx.detail = "body too large"
                await _send_json(
                    guarded_send,
                    413,
                    _error_body(413, "too_large", f"the request body is larger than {limit} bytes"),
                    extra_headers=[(b"connection", b"close")],
                )
                return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        ctx.receive = limited_receive  # type: ignore[attr-defined]  # the model runner watches it for a disconnect

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception as e:
            log.error("unhandled %s in %s %s", type(e).__name__, scope.get("method"), ctx.action)
            if not response_started:
                ctx.outcome = ctx.outcome or "error"
                ctx.detail = ctx.detail or f"unhandled {type(e).__name__}"
                await _send_json(
                    guarded_send, 500, _error_body(500, "error", "internal error; the server log names its type")
                )


def _header(scope: dict, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


def _suspicious_path(scope: dict) -> bool:
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    raw = raw.split(b"?", 1)[0]
    if b"%" in raw or b"\\" in raw or b"\x00" in raw:
        return True
    return any(seg in (".", "..") for seg in scope.get("path", "").split("/"))


async def _send_json(
    send: Callable, status: int, body: dict, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ============================================================================ keys and patient scopes

_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer cq_<key id>_<secret>")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in X-API-Key")


def _service(request: Request) -> Service:
    return request.app.state.service  # create_app puts it there


async def authenticated(
    request: Request,
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(_BEARER),
    header_key: Optional[str] = Depends(_API_KEY),
) -> KeyRecord:
    """The route dependency: the valid key of the request (Bearer or X-API-Key), else 401; its id goes to the audit."""
    ctx = _ctx(request)
    plain = credentials.credentials if credentials is not None else header_key
    challenge = {"WWW-Authenticate": 'Bearer realm="clinqa"'}
    if not plain:
        raise ApiError(
            401,
            "unauthorized",
            "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers=challenge,
            detail="no key",
        )
    key = await asyncio.to_thread(_service(request).authenticate, plain)
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "the API key is not valid (unknown, revoked or expired)",
            headers=challenge,
            detail="invalid key",
        )
    ctx.key_id = key.key_id
    return key


def patient_for(request: Request, key: KeyRecord, patient_id: str, operation: str) -> _Patient:
    """The loaded patient ``patient_id`` if ``key`` may ``operation`` on it: 400 for an id that is not a FHIR id,
    403 without the scope (whether or not the patient exists), then 404 for an id that is not loaded."""
    ctx = _ctx(request)
    if not FHIR_ID.fullmatch(patient_id) or set(patient_id) == {"."}:
        ctx.detail = "patient id is not a FHIR id"
        raise ApiError(400, "bad_patient_id", "a patient id is a FHIR id: 1-64 of A-Z a-z 0-9 - . (not only dots)")
    ctx.patient_id = patient_id
    if not key.allows(operation, patient_id):
        # the same answer whether or not the patient exists
        raise ApiError(
            403,
            "forbidden",
            f"this API key has no '{operation}' scope for this patient",
            detail=f"no {operation} scope",
        )
    patient = _service(request).patients.get(patient_id)
    if patient is None:
        raise ApiError(404, "not_found", "no patient with this id is loaded", detail="unknown patient")
    return patient
