"""The ``/api`` routes of the clinqa service: the patient list, a patient's timeline, questions about
a patient's record, multiple-choice questions, and the catch-all 404 for any other ``/api`` path.
:func:`clinqa.serve.app.create_app` adds them with :func:`add_api_routes`; what each route answers
and who may call it is in :mod:`clinqa.serve.app`'s docstring.
"""

from __future__ import annotations

import logging
import re
import time

from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError

from clinqa.serve.audit import hash_question
from clinqa.serve.auth import KeyRecord
from clinqa.serve.guard import ApiError, _ctx, authenticated, patient_for
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
from clinqa.serve.service import Service, _Patient

log = logging.getLogger("clinqa.serve")


def _summary(p: _Patient) -> PatientSummary:
    bd = p.record.birth_date
    return PatientSummary(
        id=p.record.patient_id, name=p.record.name, birth_date=bd.isoformat() if bd else None, gender=p.record.gender
    )


def _handle(p: _Patient, key: str) -> str:
    res = p.record.resources.get(key, {})
    rid = res.get("id")
    return f"{p.types.get(key, '?')}/{rid}" if rid else key


def add_api_routes(app: FastAPI, service: Service) -> None:
    """Add the ``/api`` routes over ``service`` to ``app`` (the catch-all last: add them after any other route)."""
    config = service.config

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
