"""A patient's record from a FHIR R4 server (``Patient/{id}/$everything``, paged)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from clinqa.errors import ClinqaError
from clinqa.records.fhir.assembly import _Assembly
from clinqa.records.fhir.files import _bundle_items
from clinqa.records.fhir.record import _FHIR_JSON, PatientRecord


def _http_error(url: str, response: Any) -> ClinqaError:
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            issues = [i.get("diagnostics") or (i.get("details") or {}).get("text") for i in body.get("issue", [])]
            detail = "; ".join(i for i in issues if i)
    except ValueError:
        pass
    status = response.status_code
    hint = {
        401: "the server wants credentials: pass an httpx.Client with auth",
        403: "the server refused access: pass an httpx.Client with auth",
        404: "no such patient, or the server does not support $everything",
    }.get(status, "")
    parts = [p for p in (detail, hint) if p]
    return ClinqaError(f"{url}: HTTP {status}" + (f" ({'; '.join(parts)})" if parts else ""))


def load_fhir_server(
    base_url: str,
    patient_id: str,
    *,
    client: Any = None,
    lenient: bool = False,
    include_billing: bool = False,
    timeout: float = 60.0,
    max_pages: int = 1000,
) -> PatientRecord:
    """A patient's record from a FHIR R4 server: ``GET {base}/Patient/{id}/$everything``, following
    ``link[relation=next]`` pages. `client` is an ``httpx.Client`` (e.g. with auth or a MockTransport);
    by default a plain one is made and closed."""
    import httpx

    base = base_url.rstrip("/")
    first = f"{base}/Patient/{patient_id}/$everything"
    own = client is None
    http = httpx.Client(timeout=timeout, follow_redirects=True) if own else client
    asm = _Assembly(first, lenient=lenient, include_billing=include_billing, scope="the server's response")
    try:
        url: str | None = first
        seen: set[str] = set()
        page = 0
        while url:
            if url in seen or page >= max_pages:
                asm.loose_problems.append(
                    f"{first}: stopped paging at page {page + 1} ({'loop' if url in seen else 'page limit'})"
                )
                break
            seen.add(url)
            page += 1
            try:
                resp = http.get(url, headers={"Accept": _FHIR_JSON})
            except httpx.HTTPError as exc:
                raise ClinqaError(f"{url}: cannot reach the FHIR server ({type(exc).__name__}: {exc})") from None
            if resp.status_code >= 400:
                raise _http_error(url, resp)
            try:
                bundle = resp.json()
            except ValueError:
                raise ClinqaError(
                    f"{url}: the server's answer is not JSON (content-type {resp.headers.get('content-type')!r})"
                ) from None
            where = f"{first} page {page}"
            for item in _bundle_items(bundle, where):
                if isinstance(item.resource, dict) and item.resource.get("resourceType") == "OperationOutcome":
                    issues = [i.get("diagnostics", "") for i in item.resource.get("issue", []) if isinstance(i, dict)]
                    asm.loose_problems.append(
                        f"{item.where}: server says: {'; '.join(x for x in issues if x) or 'OperationOutcome'}"
                    )
                    continue
                asm.add(item)
            nxt = next(
                (l.get("url") for l in bundle.get("link", []) if isinstance(l, dict) and l.get("relation") == "next"),
                None,
            )
            url = urljoin(url, nxt) if nxt else None
    finally:
        if own:
            http.close()
    asm.link()
    return asm.single(expected_patient=patient_id)
