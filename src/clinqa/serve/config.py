"""Settings for ``clinqa serve``: defaults < a TOML/JSON file < ``CLINQA_*`` environment variables < overrides.

    config = ServeConfig.load("serve.toml")                  # file + environment
    config = ServeConfig.load(records="bundles/", port=9000) # environment + explicit overrides

Every field can come from an environment variable named ``CLINQA_`` + the field name in capitals
(``CLINQA_RECORDS``, ``CLINQA_PORT``, ``CLINQA_CORS_ORIGINS``, ...). List fields take a
comma-separated string (``CLINQA_CORS_ORIGINS=https://a.example,https://b.example``). Unknown
``CLINQA_*`` variables are ignored (other parts of clinqa use some), unknown keys in the file are
an error. The file holds the fields at its top level or under a ``[serve]`` table; relative paths
in it are taken relative to the file.

Example ``serve.toml``::

    model = "default"
    records = "bundles/"            # a folder of FHIR Bundles, a Bundle/NDJSON file, or a patient URL
    keys_db = "state/keys.sqlite"
    audit_db = "state/audit.sqlite"
    port = 8470
    request_timeout_s = 60
    model_concurrency = 8           # calls at once to a remote backend (openai:URL#MODEL)
    local_batching = "auto"         # a local model on a GPU batches concurrent requests (on/off to force)
    # adapters = "stages/"          # serve the fine-tuned stages of `clinqa records finetune`
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clinqa.errors import ClinqaError

__all__ = ["ENV_PREFIX", "ServeConfig"]

ENV_PREFIX = "CLINQA_"
_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
_PATH_FIELDS = ("keys_db", "audit_db", "audit_anchor", "adapters")


class ServeConfig(BaseModel):
    """Everything the service needs; see the module docstring for where values come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("default", description="model spec, e.g. 'default' or 'default+lora:adapters/cardio'")
    records: list[str] = Field(
        default_factory=list,
        description="where the patient records are: folders of FHIR Bundles, Bundle or NDJSON files, "
        "patient URLs (https://server/fhir/Patient/<id>), or a FHIR base URL together with patient_ids",
    )
    patient_ids: list[str] = Field(
        default_factory=list, description="with a FHIR base URL in records: the patients to load from it"
    )
    records_lenient: bool = Field(False, description="keep invalid resources (noted as problems) instead of refusing")
    keys_db: Path = Field(Path("clinqa-keys.sqlite"), description="the API key store (SQLite, see clinqa.serve.auth)")
    audit_db: Path = Field(Path("clinqa-audit.sqlite"), description="the audit log (SQLite, see clinqa.serve.audit)")
    audit_anchor: Optional[Path] = Field(
        None,
        description="append-only file the chain head is written to at start, every "
        "audit_anchor_every entries and at shutdown (default: <audit_db>.anchor); "
        "check with `clinqa audit verify --anchor`",
    )
    audit_anchor_every: int = Field(100, ge=1, le=1_000_000, description="entries between two anchors")
    host: str = Field("127.0.0.1", description="interface to listen on; keep loopback unless TLS is in front")
    port: int = Field(8470, ge=0, le=65535)
    request_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="time budget of one model call, queue wait included"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, description="larger request bodies get 413")
    max_pending: int = Field(32, ge=1, le=10_000, description="model calls waiting or running at once; more get 503")
    model_concurrency: int = Field(
        8,
        ge=1,
        le=1024,
        description="model calls at once with a remote (openai:) backend, e.g. a vLLM cluster; "
        "with local_batching, the requests whose calls a local model batches together",
    )
    local_batching: Literal["auto", "on", "off"] = Field(
        "auto",
        description="batch concurrent requests' calls to a local model into one call (clinqa.serve.coalesce): "
        "auto = when the model is on a GPU; off (and auto on the CPU) = one call at a time",
    )
    batch_window_ms: float = Field(
        5.0, ge=0, le=10_000, description="with batching: how long a call waits for others to join its batch"
    )
    max_batch: int = Field(16, ge=1, le=4096, description="with batching: the most inputs (prompts) in one batch")
    adapters: Optional[Path] = Field(
        None,
        description="fine-tuned stages from `clinqa records finetune` (a folder with "
        "stages.json): model is their base; stage 1 is the LLM selector with its tuned threshold",
    )
    max_question_chars: int = Field(2000, ge=10, le=100_000)
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call the API from a browser (none by default)"
    )
    selector_mode: str = Field("bm25", description="stage-1 selection of the resources shown to the model")
    selector_top_k: int = Field(8, ge=1, le=200)
    max_new_tokens: int = Field(128, ge=1, le=4096)
    access_log: bool = Field(False, description="uvicorn's access log (off: the audit log is the access record)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("records", "patient_ids", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, (str, Path)):
            return [s.strip() for s in str(v).split(",") if s.strip()]
        return v

    @field_validator("patient_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for pid in v:
            if not _ID.fullmatch(pid):
                raise ValueError(f"patient id {pid!r} is not a FHIR id (1-64 of A-Z a-z 0-9 . -)")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*":
                raise ValueError("'*' would let any web page call the API with a user's key; list the origins")
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"CORS origin {origin!r} must look like https://host[:port] (no path)")
        return v

    @model_validator(mode="after")
    def _base_url_needs_ids(self) -> ServeConfig:
        bases = [r for r in self.records if r.startswith(("http://", "https://")) and "/Patient/" not in r]
        if bases and not self.patient_ids:
            raise ValueError(
                f"records {bases[0]!r} is a FHIR base URL: give patient_ids too (or patient URLs .../Patient/<id>)"
            )
        if self.patient_ids and not bases:
            raise ValueError("patient_ids only apply with a FHIR base URL in records")
        return self

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        file: str | os.PathLike[str] | None = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        **overrides: Any,
    ) -> ServeConfig:
        """Defaults, then ``file`` (TOML or JSON; ``$CLINQA_CONFIG`` if not given), then ``CLINQA_*``
        variables from ``env`` (default ``os.environ``), then ``overrides`` (None values are skipped)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        file = file if file is not None else env.get(f"{ENV_PREFIX}CONFIG") or None
        if file is not None:
            values.update(cls._read_file(Path(file)))
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors()
            )
            where = f" (file {file}, CLINQA_* variables, options)" if file else " (CLINQA_* variables, options)"
            raise ClinqaError(f"bad serve settings{where}: {problems}") from None

    @classmethod
    def _read_file(cls, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ClinqaError(f"serve config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import tomllib

                data = tomllib.loads(text)
        except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
            raise ClinqaError(
                f"serve config file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {e}"
            ) from None
        if not isinstance(data, dict):
            raise ClinqaError(f"serve config file {path} must hold a table/object of settings")
        if set(data) == {"serve"} and isinstance(data["serve"], dict):
            data = data["serve"]
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ClinqaError(
                f"serve config file {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(cls.model_fields)}"
            )
        base = path.parent
        for name in _PATH_FIELDS:
            if isinstance(data.get(name), str) and not Path(data[name]).is_absolute():
                data[name] = str(base / data[name])
        recs = data.get("records")
        if recs is not None:
            items = [recs] if isinstance(recs, str) else recs
            if isinstance(items, list):
                data["records"] = [
                    str(base / r)
                    if isinstance(r, str) and not r.startswith(("http://", "https://")) and not Path(r).is_absolute()
                    else r
                    for r in items
                ]
        return data

    def env_names(self) -> dict[str, str]:
        """Field name -> its environment variable, for help texts."""
        return {name: ENV_PREFIX + name.upper() for name in type(self).model_fields}
