"""The state behind the clinqa service: :class:`Service` holds the config, the API key store, the audit
log, the patient records (indexed once at startup: :class:`_Patient`), the stage-1 selector and the
model runner; :func:`load_patient_records` reads the records a config names. The routes are in
:mod:`clinqa.serve.app`, the request guard in :mod:`clinqa.serve.guard`.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional

from clinqa.errors import ClinqaError
from clinqa.serve.audit import AuditLog, default_anchor_path
from clinqa.serve.auth import KeyRecord, KeyStore
from clinqa.serve.config import ServeConfig
from clinqa.serve.guard import ApiError, _AuditContext, write_audit
from clinqa.serve.redaction import RedactingFilter
from clinqa.serve.runner import ModelRunner, RunnerRefused, load_models

__all__ = ["Service", "load_patient_records"]

log = logging.getLogger("clinqa.serve")


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


class Service:
    """The state behind the app: config, key store, audit log, records, model runner."""

    def __init__(
        self, config: ServeConfig, predictor: Any = None, records: Optional[Iterable[Any]] = None, selector: Any = None
    ):
        from clinqa.records.selector_factory import make_selector

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

        self.selector = make_selector(config.selector_mode, top_k=config.selector_top_k)
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
        """The request's one audit entry (:func:`clinqa.serve.guard.write_audit`); the guard calls it."""
        await write_audit(self.audit, ctx, status)

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
