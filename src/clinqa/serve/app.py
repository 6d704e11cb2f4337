"""The private clinqa service: a FastAPI app over one model, a fixed set of patient records, the API
key store (:mod:`clinqa.serve.auth`) and the audit log (:mod:`clinqa.serve.audit`).

    from clinqa.serve.app import ServeConfig, create_app, serve
    serve(ServeConfig.load("serve.toml"))                    # uvicorn on config.host:config.port
    app = create_app(config, predictor=p, records=records)   # or build the ASGI app yourself (tests)

Endpoints
---------
=========================================  ======  ================================================
``GET  /``                                  none    the page (served from ``serve/static``, no CDN)
``GET  /health``                            none    liveness: the process answers
``GET  /ready``                             none    200 once the model and records are loaded, else 503
``GET  /openapi.json``                      none    the API description
``GET  /api/patients``                      key     id, name, birth date of the patients the key may *read*
``GET  /api/patients/{id}/timeline``        read    every resource: id, type, date, rendered line
``POST /api/patients/{id}/ask``             ask     ``{"question"}`` -> answer, citations (with their
                                                    rendered line), flagged invalid citations,
                                                    stage-1 selection, timings
``POST /api/mcq``                           ask*    ``{"question", "options": {"A": ..}, "method"}`` ->
                                                    prediction and per-option probabilities
=========================================  ======  ================================================

Keys go in ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A missing or invalid key gets
401. ``/api/mcq`` is about no patient, so it needs a key with an ``ask`` scope for *some* patient
(``patient/<any id or *>.ask``); ``admin`` alone is not enough.

403 or 404
    A key without the scope gets 403, whether or not the patient exists, with the same body, so it
    learns nothing about which ids exist. Only a key that may use the operation on the id (in
    practice ``patient/*``) gets 404 for an id that is not loaded.

Audit
    Every ``/api`` request, whatever its outcome (ok, unauthorized, forbidden, not_found,
    bad_request, timeout, busy, unavailable, error), appends exactly one audit entry: key id,
    patient id, sha256 of the question (never its text), the resource ids whose content or
    identity the response returns, outcome. The entry is written (fsynced) *before* the response
    starts, so every response a client received has its entry; if the audit write fails, the
    client gets 500 instead of the answer. ``/``, ``/static``, ``/health``, ``/ready`` and
    ``/openapi.json`` hold no patient data and are not audited.

Model calls
    See :mod:`clinqa.serve.runner`: a local model answers one call at a time, in arrival order; a
    remote backend (``openai:``, e.g. a vLLM cluster) up to ``model_concurrency`` calls at once (default
    8). At most ``max_pending`` calls wait or run (more get 503 ``busy``). Each request has
    ``request_timeout_s`` for its model call, queue wait included; past it the client gets 504
    ``timeout`` at once. A client that closes the connection while its call waits or runs has the
    call cancelled, audited as ``cancelled``. An abandoned call is stopped as soon as possible: if it
    is still queued it never runs; if it is running, a cancel flag makes the next call the pipeline
    makes into the model raise, aborts a local model's generation at the next forward pass, and stops
    a remote backend from sending further requests or retries (one already sent is left to finish
    and its answer discarded).

Hostile input
    Bodies over ``max_body_bytes`` get 413 (by Content-Length, and by counting a streamed body);
    malformed JSON or fields get 422 with a message naming the problem; ``/api`` paths with
    percent-encoding, backslashes or dot segments, and patient ids that are not FHIR ids
    (``[A-Za-z0-9\\-.]{1,64}``, not all dots) get 400. CORS is closed unless ``cors_origins`` names
    origins. Responses carry ``Cache-Control: no-store`` (API), a strict Content-Security-Policy,
    ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.

Citations
    The answer cites resource ids; the response keeps only ids of resources in *the requested
    patient's* record, each with its rendered line. Anything else (an id from another patient, say
    because a record's free text tried to steer the model) is moved to ``invalid_citations`` and
    replaced by ``[citation removed]`` in the answer text.

Logging
    Nothing here logs question text or record content. As a second line, :class:`RedactingFilter`
    (installed on the root and uvicorn log handlers by :func:`create_app` and :func:`serve`)
    replaces exception messages by the exception type (a library's exception message may quote its
    input) and blanks out the question and rendered record lines of requests in flight wherever a
    log message would contain them. uvicorn's access log is off by default: the audit log is the
    access record.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from clinqa import __version__
from clinqa.errors import ClinqaError
from clinqa.serve.audit import AuditLog, default_anchor_path, hash_question
from clinqa.serve.auth import KeyRecord, KeyStore
from clinqa.serve.config import ServeConfig
from clinqa.serve.redaction import _FILTER, RedactingFilter, install_log_redaction  # noqa: F401  (re-exported)
from clinqa.serve.runner import ModelRunner, RequestCancelled, RunnerRefused, load_models
from clinqa.serve.schemas import (
    _ERRORS,
    AskRequest,
    AskResponse,
    ErrorBody,
    MCQRequest,
    MCQResponse,
    PatientList,
    PatientSummary,
    SelectedResource,
    Timeline,
    TimelineEntry,
)

__all__ = [
    "FHIR_ID",
    "ModelRunner",
    "RedactingFilter",
    "RequestCancelled",
    "ServeConfig",
    "Service",
    "create_app",
    "install_log_redaction",
    "load_patient_records",
    "serve",
]

log = logging.getLogger("clinqa.serve")

STATIC_DIR = Path(__file__).with_name("static")
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


_API_DESCRIPTION = """Questions over patient records with a private language model.

**Keys**: `Authorization: Bearer <key>` or `X-API-Key: <key>`; missing or invalid -> 401.
Scopes are SMART-style: `patient/<id|*>.read` (list, timeline), `patient/<id|*>.ask` (ask);
`/api/mcq` needs an `ask` scope for some patient.

**403 or 404**: a key without the scope gets 403 whether or not the patient exists (same body);
only a key allowed on the id (`patient/*`) learns that an id is unknown (404).

**Audit**: every `/api` request appends one entry to a hash-chained audit log (key id, patient id,
sha256 of the question, resource ids returned, outcome) before the response is sent.

**Limits**: bodies over the configured size -> 413; malformed JSON -> 422; ids that are not FHIR ids
or encoded paths -> 400; a model call over the time budget -> 504; too many waiting -> 503.

Errors are `{"error": code, "message": text, "status": status}`.
"""


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


# ============================================================================ records


def load_patient_records(config: ServeConfig) -> list[Any]:
    """The PatientRecords named by ``config.records`` (paths, patient URLs, or a base URL with patient_ids)."""
    from clinqa.records.fhir import load_fhir_server, load_records

    out = []
    for source in config.records:
        if source.startswith(("http://", "https://")) and "/Patient/" not in source:
            out.extend(load_fhir_server(source, pid, lenient=config.records_lenient) for pid in config.patient_ids)
        else:
            out.extend(load_records(source, lenient=config.records_lenient))
    return out


@dataclass
class _Patient:
    record: Any
    lines: list[tuple[str, str]]  # (resource key, rendered line), timeline order
    text: dict[str, str]  # key -> line
    handles: dict[str, str]  # key, "Type/id" and "[Type/id]" -> key
    types: dict[str, str]  # key -> resourceType
    dates: dict[str, Optional[str]]  # key -> ISO date


def _index_patient(record: Any) -> _Patient:
    from clinqa.records.render import render_record, resource_date

    lines = render_record(record)
    types, dates, handles = {}, {}, {}
    for key, res in record.resources.items():
        rtype = str(res.get("resourceType", "?"))
        types[key] = rtype
        d = resource_date(res)
        dates[key] = d.isoformat() if d else None
        handles[key] = key
        if res.get("id"):
            handles.setdefault(f"{rtype}/{res['id']}", key)
    return _Patient(record=record, lines=lines, text=dict(lines), handles=handles, types=types, dates=dates)


# ============================================================================ the service


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


class Service:
    """The state behind the app: config, key store, audit log, records, model runner."""

    def __init__(
        self, config: ServeConfig, predictor: Any = None, records: Optional[Iterable[Any]] = None, selector: Any = None
    ):
        from clinqa.records.pipeline import RetrievalSelector

        self.config = config
        self.keys = KeyStore(config.keys_db)
        self.audit = AuditLog(
            config.audit_db,
            anchor=config.audit_anchor or default_anchor_path(config.audit_db),
            anchor_every=config.audit_anchor_every,
        )
        self.audit.write_anchor("start")
        if records is None:
            records = load_patient_records(config)
        self.patients: dict[str, _Patient] = {}
        for record in records:
            if record.patient_id in self.patients:
                raise ClinqaError(f"patient {record.patient_id} is loaded twice (two sources hold it); remove one")
            self.patients[record.patient_id] = _index_patient(record)
        from clinqa.records.pipeline import answer_question

        self.selector = RetrievalSelector(mode=config.selector_mode, top_k=config.selector_top_k)
        self.pass_lines = "lines" in inspect.signature(answer_question).parameters
        self.runner = ModelRunner.from_config(config)
        self.load_error: Optional[str] = None
        self._loading: Optional[Future] = None
        self._auth_slots = threading.BoundedSemaphore(4)  # scrypt takes 16 MB each: bound the concurrent checks
        if selector is not None:
            self.selector = selector  # the fine-tuned stage-1 selector (config.adapters)
        if predictor is not None:
            self.runner.set_predictor(predictor)

    @property
    def ready(self) -> bool:
        return self.runner.predictor is not None

    def start_loading(self) -> None:
        """Load the model spec on the model thread, unless a predictor was given or loading started."""
        if self.ready or self._loading is not None:
            return

        def load() -> None:
            t0 = time.perf_counter()
            try:
                predictor, selector = load_models(self.config)
            except Exception as e:
                self.load_error = f"{type(e).__name__}: {e}" if isinstance(e, ClinqaError) else type(e).__name__
                log.error("loading model %r failed: %s", self.config.model, self.load_error)
                return
            if selector is not None:
                self.selector = selector
            self.runner.set_predictor(predictor)
            log.info(
                "model %s loaded in %.1f s (%d model call(s) at once)",
                self.config.model,
                time.perf_counter() - t0,
                self.runner.parallel,
            )

        self._loading = self.runner.submit(load)

    def close(self) -> None:
        self.runner.close()
        try:
            self.audit.write_anchor("shutdown")
        finally:
            self.audit.close()

    def authenticate(self, plain: str) -> Optional[KeyRecord]:
        with self._auth_slots:
            return self.keys.authenticate(plain)

    async def write_audit(self, ctx: _AuditContext, status: int) -> None:
        outcome = ctx.outcome or _outcome_for(status)
        detail = ctx.detail or ("" if outcome == "ok" else f"HTTP {status}")
        await asyncio.to_thread(
            self.audit.append,
            ctx.action,
            key_id=ctx.key_id,
            patient_id=ctx.patient_id,
            question_hash=ctx.question_hash,
            resource_ids=ctx.resource_ids,
            outcome=outcome,
            detail=detail,
        )

    def budget_left(self, ctx: _AuditContext) -> float:
        return self.config.request_timeout_s - (time.perf_counter() - ctx.started)

    async def call_model(
        self, ctx: _AuditContext, what: str, secrets: Sequence[str], call: Callable[[Any], Any]
    ) -> Any:
        """`call(predictor)` on the model thread within the request's time budget, with `secrets` (the
        question, record text) redacted from every log line meanwhile; any failure but an ApiError
        becomes a 500 that names only the error type."""
        token = id(ctx)
        RedactingFilter.register(token, secrets)
        try:
            return await self.runner.run(call, budget=self.budget_left(ctx), receive=getattr(ctx, "receive", None))
        except RunnerRefused as e:
            raise ApiError(
                e.status, e.error, e.message, headers=e.headers, outcome=e.outcome, detail=e.detail
            ) from None
        except ApiError:
            raise
        except Exception as e:
            log.error("%s failed on the model thread: %s", what, type(e).__name__)
            raise ApiError(
                500,
                "model_error",
                "the model call failed; the server log names the error type",
                outcome="error",
                detail=f"model call failed: {type(e).__name__}",
            ) from None
        finally:
            RedactingFilter.unregister(token)


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


# ============================================================================ the app


def _validation_message(errors: Sequence[dict]) -> tuple[str, list[dict]]:
    problems = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            problems.append({"loc": "body", "msg": f"the body is not valid JSON ({why} at character {err['loc'][-1]})"})
        elif err.get("type") == "model_attributes_type" and tuple(err.get("loc", ())) == ("body",):
            problems.append({"loc": "body", "msg": "send a JSON object with Content-Type: application/json"})
        else:
            problems.append({"loc": loc, "msg": str(err.get("msg", "invalid"))})
    return "; ".join(f"{p['loc']}: {p['msg']}" for p in problems) or "invalid request", problems


def _ctx(request: Request) -> _AuditContext:
    return request.scope["state"]["audit"]


def _summary(p: _Patient) -> PatientSummary:
    bd = p.record.birth_date
    return PatientSummary(
        id=p.record.patient_id, name=p.record.name, birth_date=bd.isoformat() if bd else None, gender=p.record.gender
    )


def _handle(p: _Patient, key: str) -> str:
    res = p.record.resources.get(key, {})
    rid = res.get("id")
    return f"{p.types.get(key, '?')}/{rid}" if rid else key


def create_app(
    config: ServeConfig, *, predictor: Any = None, records: Optional[Iterable[Any]] = None, selector: Any = None
) -> FastAPI:
    """The ASGI app. ``predictor`` (a Predictor) and ``records`` (PatientRecords) are loaded from ``config`` when
    not given: records now, the model at startup (in the background; ``/ready`` says when it is there)."""
    service = Service(config, predictor=predictor, records=records, selector=selector)
    install_log_redaction()
    if not service.patients:
        log.warning(
            "no patient records loaded (records=%s); the patient endpoints will have nothing to show", config.records
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start_loading()
        try:
            yield
        finally:
            service.close()

    kwargs: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # never export traces/logs (they could carry exception messages) even if OpenTelemetry is configured
        kwargs["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="clinqa",
        version=__version__,
        description=_API_DESCRIPTION,
        docs_url=None,  # the interactive docs pull scripts from a CDN; this service stays offline
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
        **kwargs,
    )
    app.state.service = service

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer cq_<key id>_<secret>")
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in X-API-Key")

    async def authenticated(
        request: Request,
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
        header_key: Optional[str] = Depends(api_key),
    ) -> KeyRecord:
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
        key = await asyncio.to_thread(service.authenticate, plain)
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
        patient = service.patients.get(patient_id)
        if patient is None:
            raise ApiError(404, "not_found", "no patient with this id is loaded", detail="unknown patient")
        return patient

    # -- error handlers

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        ctx = request.scope.get("state", {}).get("audit")
        if isinstance(exc, ApiError):
            code = exc.error
            if ctx is not None:
                ctx.outcome = ctx.outcome or exc.outcome
                ctx.detail = ctx.detail or exc.audit_detail
        else:
            code = _ERROR_BY_STATUS.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and not isinstance(exc, ApiError):
            message = "no such endpoint; see /openapi.json"
        return JSONResponse(
            _error_body(exc.status_code, code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = _validation_message(exc.errors())
        ctx = request.scope.get("state", {}).get("audit")
        if ctx is not None:
            ctx.detail = "invalid request: " + ", ".join(sorted({p["loc"] for p in problems}))[:150]
        return JSONResponse(_error_body(422, "invalid_request", message, problems=problems), status_code=422)

    # -- unauthenticated

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", tags=["service"], summary="liveness (no key)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["service"],
        summary="readiness: model and records loaded (no key)",
        responses={503: {"description": "still loading, or loading failed"}},
    )
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready"})
        if service.load_error:
            return JSONResponse(
                {"status": "failed", "message": f"the model could not be loaded ({service.load_error})"},
                status_code=503,
            )
        return JSONResponse({"status": "loading"}, status_code=503)

    # -- patients

    @app.get(
        "/api/patients",
        response_model=PatientList,
        tags=["patients"],
        responses=_ERRORS,
        summary="the patients this key may read",
    )
    async def list_patients(request: Request, key: KeyRecord = Depends(authenticated)) -> PatientList:
        ids = key.visible_patients(service.patients, "read")
        _ctx(request).resource_ids = [f"Patient/{pid}" for pid in ids]
        return PatientList(patients=[_summary(service.patients[pid]) for pid in ids])

    @app.get(
        "/api/patients/{patient_id}/timeline",
        response_model=Timeline,
        tags=["patients"],
        responses=_ERRORS,
        summary="every resource of the record, rendered (scope read)",
    )
    async def timeline(request: Request, patient_id: str, key: KeyRecord = Depends(authenticated)) -> Timeline:
        p = patient_for(request, key, patient_id, "read")
        entries = [TimelineEntry(id=k, type=p.types[k], date=p.dates[k], text=line) for k, line in p.lines]
        _ctx(request).resource_ids = [_handle(p, e.id) for e in entries]
        return Timeline(patient=_summary(p), resources=entries)

    @app.post(
        "/api/patients/{patient_id}/ask",
        response_model=AskResponse,
        tags=["patients"],
        responses={**_ERRORS, 500: {"model": ErrorBody}},
        summary="ask about one patient's record (scope ask)",
    )
    async def ask(
        request: Request, patient_id: str, body: AskRequest, key: KeyRecord = Depends(authenticated)
    ) -> AskResponse:
        from clinqa.records.pipeline import answer_question

        ctx = _ctx(request)
        question = body.question
        ctx.question_hash = hash_question(question)  # refused attempts are audited with it too
        p = patient_for(request, key, patient_id, "ask")
        if not question.strip():
            raise ApiError(422, "invalid_request", "the question is empty", detail="empty question")
        if len(question) > config.max_question_chars:
            raise ApiError(
                422,
                "invalid_request",
                f"the question is longer than {config.max_question_chars} characters",
                detail="question too long",
            )
        t0 = time.perf_counter()
        extra = {"lines": p.lines} if service.pass_lines else {}  # already rendered at startup
        result = await service.call_model(
            ctx,
            "ask",
            [question, *p.text.values()],
            lambda predictor: answer_question(
                predictor, p.record, question, selector=service.selector, max_new_tokens=config.max_new_tokens, **extra
            ),
        )
        elapsed = time.perf_counter() - t0

        cited: list[str] = []
        invalid: list[str] = []
        for ref in [*result.citations, *result.invalid_citations]:
            key_ = p.handles.get(str(ref).strip().strip("[]"))
            if key_ is not None and ref not in result.invalid_citations:
                if key_ not in cited:
                    cited.append(key_)
            elif ref not in invalid:
                invalid.append(str(ref))
        answer = result.answer
        for ref in invalid:  # "[Observation/x]" and "[Condition/a, Observation/x]" alike
            answer = re.sub(re.escape(ref) + r"(?![A-Za-z0-9\-])", "citation removed", answer)
        selected = []
        for s in result.selected:
            key_ = p.handles.get(str(s.id))
            if key_ is not None:
                selected.append(SelectedResource(id=key_, type=p.types[key_], date=p.dates[key_], score=float(s.score)))
        ctx.resource_ids = list(dict.fromkeys([_handle(p, k) for k in cited] + [_handle(p, s.id) for s in selected]))
        if invalid:
            ctx.detail = f"{len(invalid)} invalid citation(s) removed"
        log.info(
            "ask key=%s patient=%s cited=%d invalid=%d %.2fs", ctx.key_id, patient_id, len(cited), len(invalid), elapsed
        )
        return AskResponse(
            patient_id=patient_id,
            answer=answer,
            citations=[TimelineEntry(id=k, type=p.types[k], date=p.dates[k], text=p.text[k]) for k in cited],
            invalid_citations=invalid,
            supported=bool(cited) or (result.supported and not result.citations),  # an abstention needs no citation
            selected=selected,
            timings={
                **{k: float(v) for k, v in result.timings.items()},
                "model_call_s": elapsed,
                "total_s": time.perf_counter() - ctx.started,
            },
            tokens=int(result.tokens),
            model=service.runner.predictor.info.spec,
        )

    # -- multiple choice

    @app.post(
        "/api/mcq",
        response_model=MCQResponse,
        tags=["questions"],
        responses={**_ERRORS, 500: {"model": ErrorBody}},
        summary="score a multiple-choice question (needs an ask scope for some patient)",
    )
    async def mcq(request: Request, body: MCQRequest, key: KeyRecord = Depends(authenticated)) -> MCQResponse:
        from clinqa.data.schema import Question
        from clinqa.evaluate.methods import SCORERS, make_items

        ctx = _ctx(request)
        ctx.question_hash = hash_question(body.question)
        if "ask" not in key.operations:
            raise ApiError(403, "forbidden", "this API key has no 'ask' scope for any patient", detail="no ask scope")
        if len(body.question) > config.max_question_chars:
            raise ApiError(
                422,
                "invalid_request",
                f"the question is longer than {config.max_question_chars} characters",
                detail="question too long",
            )
        try:
            question = Question(
                id="api", question=body.question, options=body.options, answer=next(iter(body.options), "A")
            )
        except ValidationError as e:
            msgs = "; ".join(str(err.get("msg", "")).removeprefix("Value error, ") for err in e.errors())
            raise ApiError(
                422, "invalid_request", f"bad question or options: {msgs}", detail="invalid options"
            ) from None
        items = make_items([question], shuffles=1, seed=0)
        scorer = SCORERS[body.method]
        t0 = time.perf_counter()
        samples = await service.call_model(
            ctx,
            "mcq",
            [body.question, *body.options.values()],
            lambda predictor: scorer(predictor, items, max_new_tokens=config.max_new_tokens),
        )
        sample, item = samples[0], items[0]
        back = item.to_original
        return MCQResponse(
            prediction=back.get(sample.pred) if sample.pred else None,
            probabilities={back[k]: float(v) for k, v in sample.probs.items()} if sample.probs else None,
            scores={back[k]: float(v) for k, v in sample.scores.items()},
            method=body.method,
            generated=sample.extras.get("generated"),
            timings={"model_call_s": time.perf_counter() - t0, "total_s": time.perf_counter() - ctx.started},
            model=service.runner.predictor.info.spec,
        )

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown_api(rest: str) -> None:
        raise ApiError(404, "not_found", "no such endpoint; see /openapi.json", detail="unknown endpoint")

    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            allow_credentials=False,
            max_age=600,
        )
    # added last = outermost of the user middleware (inside Starlette's ServerErrorMiddleware, outside CORS)
    app.add_middleware(_Guard, service=service)
    return app


def serve(config: ServeConfig) -> None:
    """Load the model and records (failing fast with a ClinqaError), then run uvicorn until stopped."""
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: API keys travel in clear over HTTP; put TLS (a reverse proxy) in front", config.host
        )
    records = load_patient_records(config)
    t0 = time.perf_counter()
    predictor, selector = load_models(config)
    log.info(
        "model %s loaded in %.1f s; %d patients%s",
        config.model,
        time.perf_counter() - t0,
        len(records),
        f"; fine-tuned stages from {config.adapters}" if selector is not None else "",
    )
    app = create_app(config, predictor=predictor, records=records, selector=selector)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        access_log=config.access_log,
        log_level=config.log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(uv_config)
    install_log_redaction()  # uvicorn.Config set up its own handlers
    server.run()
