"""The service's API request and response models (the OpenAPI schema comes from these)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class PatientSummary(BaseModel):
    id: str
    name: str
    birth_date: Optional[str] = None
    gender: Optional[str] = None


class PatientList(BaseModel):
    patients: list[PatientSummary]


class TimelineEntry(BaseModel):
    id: str = Field(description="the resource's key in the record (its FHIR id); anchor #res-<id> on the page")
    type: str
    date: Optional[str] = Field(None, description="clinically relevant date, YYYY-MM-DD")
    text: str = Field(description="the rendered line the model reads")


class Timeline(BaseModel):
    patient: PatientSummary
    resources: list[TimelineEntry]


class AskRequest(BaseModel):
    question: str = Field(min_length=1, max_length=100_000)


class SelectedResource(BaseModel):
    id: str
    type: str
    date: Optional[str] = None
    score: float


class AskResponse(BaseModel):
    patient_id: str
    answer: str
    citations: list[TimelineEntry] = Field(description="cited resources of this patient, with their rendered lines")
    invalid_citations: list[str] = Field(description="cited ids that are not this patient's resources: removed")
    supported: bool = Field(
        True,
        description="false when the answer claims something without citing any resource of "
        "this patient's record: it may be about someone else; do not trust it",
    )
    selected: list[SelectedResource] = Field(description="stage 1: the resources shown to the model, best first")
    timings: dict[str, float]
    tokens: int
    model: str


class MCQRequest(BaseModel):
    question: str = Field(min_length=1, max_length=100_000)
    options: dict[str, str] = Field(description='{"A": "...", "B": "...", ...}: consecutive letters from A')
    method: Literal["option", "letter", "generate"] = "option"


class MCQResponse(BaseModel):
    prediction: Optional[str] = Field(description="the chosen letter; null if a generated answer named none")
    probabilities: Optional[dict[str, float]] = Field(description="per option; null for method=generate")
    scores: dict[str, float]
    method: str
    generated: Optional[str] = None
    timings: dict[str, float]
    model: str


class ErrorBody(BaseModel):
    error: str
    message: str
    status: int


_ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 422, 503, 504)}
