"""`clinqa serve`, `keys` and `audit`: the private service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clinqa.cli.app import app, audit_app, keys_app
from clinqa.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    console,
    err,
)
from clinqa.errors import ClinqaError
from clinqa.textsafe import safe


@app.command("serve")
def serve_cmd(
    model: Optional[str] = typer.Option(
        None, help="model spec (default, +lora:, +rag:, openai:URL#MODEL for vLLM, ...)"
    ),
    records: list[str] = typer.Option(
        [], "--records", help="records folder/file or https://server/fhir/Patient/ID (repeatable)"
    ),
    host: Optional[str] = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default 8470)"),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML/JSON settings file (else $CLINQA_CONFIG); CLINQA_* env vars also apply"
    ),
    keys_db: Optional[Path] = typer.Option(None, "--keys-db"),
    audit_db: Optional[Path] = typer.Option(None, "--audit-db"),
    adapters: Optional[Path] = typer.Option(
        None,
        "--adapters",
        help="fine-tuned stages from `records finetune`: MODEL is "
        "their base; stage 1 is the llm selector with the stage-1 adapter and its threshold",
    ),
    model_concurrency: Optional[int] = typer.Option(
        None,
        "--model-concurrency",
        help="model calls at once with an openai: backend, or requests batched together by a local model "
        "with batching (default 8)",
    ),
    local_batching: Optional[str] = typer.Option(
        None,
        "--local-batching",
        help="auto|on|off: batch concurrent requests' calls to a local model (auto: on a GPU; default auto)",
    ),
    batch_window_ms: Optional[float] = typer.Option(
        None, "--batch-window-ms", help="with batching: ms a call waits for others to join its batch (default 5)"
    ),
    max_batch: Optional[int] = typer.Option(
        None, "--max-batch", help="with batching: the most prompts in one batched call (default 16)"
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """The private HTTP service and web page: patient-scoped API keys, audit log, record QA and MCQ answering."""
    from clinqa.serve.app import serve
    from clinqa.serve.config import ServeConfig

    overrides = {
        k: v
        for k, v in {
            "model": model,
            "records": list(records) or None,
            "host": host,
            "port": port,
            "keys_db": keys_db,
            "audit_db": audit_db,
            "adapters": adapters,
            "model_concurrency": model_concurrency,
            "local_batching": local_batching,
            "batch_window_ms": batch_window_ms,
            "max_batch": max_batch,
        }.items()
        if v is not None
    }
    serve(ServeConfig.load(config, **overrides))


def _keystore(path: Path, create: bool = False):
    from clinqa.serve.auth import KeyStore

    return KeyStore(path, create=create)


KEYS_DB = typer.Option(
    Path(os.environ.get("CLINQA_KEYS_DB", "clinqa-keys.db")), "--db", help="key store file (env CLINQA_KEYS_DB)"
)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="who or what uses the key, e.g. 'ward-7 tablet'"),
    patients: str = typer.Option("", help="comma-separated patient ids, or * for all"),
    operations: str = typer.Option("read,ask", help="comma-separated: read, ask, admin"),
    days: Optional[int] = typer.Option(None, help="expires after this many days"),
    db: Path = KEYS_DB,
) -> None:
    """Create a key; the plain key is printed once and never stored."""
    import datetime as dt

    if days is not None and days < 1:
        raise ClinqaError(
            f"--days {days}: a key must live at least 1 day (leave --days out for a key that never expires)"
        )
    rec, plain = _keystore(db, create=True).create(
        name,
        [p for p in patients.split(",") if p],
        [o for o in operations.split(",") if o],
        expires=dt.timedelta(days=days) if days is not None else None,
    )
    console.print(f"key id {safe(rec.key_id)} · scopes: {safe(rec.scope_text)}")
    console.print(plain, highlight=False, markup=False)


@keys_app.command("list")
def keys_list(db: Path = KEYS_DB) -> None:
    """List keys (ids, names, scopes, status; never secrets)."""
    table = Table()
    for col in ("key id", "name", "scopes", "created", "expires", "status"):
        table.add_column(col)
    for k in _keystore(db).list():
        table.add_row(
            *(
                safe(v)
                for v in (k.key_id, k.name, k.scope_text, str(k.created)[:19], str(k.expires or "")[:19], k.status())
            )
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...), db: Path = KEYS_DB) -> None:
    """Revoke a key at once."""
    rec = _keystore(db).revoke(key_id)
    console.print(f"revoked {safe(rec.key_id)} ({safe(rec.name)})")


@audit_app.command("verify")
def audit_verify(
    db: Path = typer.Option(
        Path(os.environ.get("CLINQA_AUDIT_DB", "clinqa-audit.db")), "--db", help="audit log file (env CLINQA_AUDIT_DB)"
    ),
    anchor: Optional[Path] = typer.Option(
        None,
        "--anchor",
        help="anchor file the service wrote (default: DB.anchor beside "
        "the log, if there): every anchored entry must still be there, unchanged",
    ),
) -> None:
    """Recompute the audit log's hash chain (opened read-only); exit 1 if it was tampered with."""
    from clinqa.serve.audit import default_anchor_path, read_anchors, verify_file

    if anchor is None and default_anchor_path(db).is_file():
        anchor = default_anchor_path(db)
    anchors = read_anchors(anchor) if anchor is not None else None
    result = verify_file(db, anchors)
    if result.ok:
        checked = (
            f"; {len(anchors)} anchors from {safe(anchor)} match" if anchors is not None else "; no anchor file checked"
        )
        console.print(f"[green]ok[/green]: {result.n} entries, chain intact{checked}")
    else:
        err.print(f"[bold red]TAMPERED[/bold red]: {safe(result.message)} (first bad entry {result.first_bad_seq})")
        raise typer.Exit(1)
