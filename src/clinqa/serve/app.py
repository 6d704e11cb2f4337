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

Layout: this module builds the app (:func:`create_app`: error handlers, the page and service routes,
middleware) and runs it (:func:`serve`); the ``/api`` routes are :mod:`clinqa.serve.api_routes`; the
request guard (the outermost ASGI layer, key and patient-scope checks, the audit entry around each
request) is :mod:`clinqa.serve.guard`; the state behind the routes (config, keys, audit log, records,
selector, model runner) is :class:`clinqa.serve.service.Service`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from clinqa import __version__
from clinqa.serve.api_routes import add_api_routes
from clinqa.serve.config import ServeConfig
from clinqa.serve.guard import (
    _ERROR_BY_STATUS,
    FHIR_ID,
    ApiError,
    BodyTooLarge,  # noqa: F401  (re-exported)
    _error_body,
    _Guard,
)
from clinqa.serve.redaction import _FILTER, RedactingFilter, install_log_redaction  # noqa: F401  (re-exported)
from clinqa.serve.runner import ModelRunner, RequestCancelled, load_models
from clinqa.serve.service import Service, load_patient_records

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

    add_api_routes(app, service)

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
