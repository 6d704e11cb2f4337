"""Validation of one resource against the FHIR R4B models of ``fhir.resources`` (see the package
docstring for why R4B), as (field path, message) pairs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _model_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(resource)"


def _clean_msg(msg: str) -> str:
    msg = msg.removeprefix("Value error, ").strip().rstrip(".")
    if msg == "Extra inputs are not permitted":
        return "unknown field (not in FHIR R4)"
    return msg


def validation_errors(resource: dict) -> list[tuple[str, str]]:
    """(field path, message) for every way `resource` fails the FHIR R4(B) model; [] when valid."""
    rtype = resource.get("resourceType")
    try:
        model = _model_class(rtype)
    except (ValueError, KeyError, TypeError, AttributeError):
        return [("resourceType", f"unknown resource type {rtype!r}")]
    try:
        model.model_validate(resource)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if callable(errors):
            return [(_loc(e.get("loc", ())), _clean_msg(str(e.get("msg", "")))) for e in errors()] or [
                ("(resource)", _clean_msg(str(exc)))
            ]
        return [("(resource)", _clean_msg(str(exc)))]
    return []
