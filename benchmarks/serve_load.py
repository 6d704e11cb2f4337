"""Load and fault test of `clinqa serve`: a real server process on 127.0.0.1, concurrent clients, and the audit log
checked against what the clients saw.

    python benchmarks/serve_load.py                       # embedded model, 4 clients for 20 s, then the fault run
    python benchmarks/serve_load.py --model fake          # a 50 ms fake model: the service's own overhead
    python benchmarks/serve_load.py --no-fault --json out.json
    python benchmarks/serve_load.py --model 'openai:http://lb:8080/v1#llama70b' --model-concurrency 32 --clients 64

Load run: the server (`clinqa.serve.app.serve`, the production entry point) serves synthetic patients;
N clients (httpx, asyncio) ask questions for --duration seconds (requests in flight at the end are
awaited). Every question is unique, so its sha256 names exactly one request in the audit log.
Reported: requests/s, latency p50/p95/p99, errors (any non-2xx or transport error: must be zero),
and the audit check: every request has exactly one audit entry (by question hash) and the chain
verifies.

Fault run: the same load; once --kill-after-acks responses were acknowledged (2xx received) the
server gets SIGKILL mid-load. It is restarted on the same files, the chain must verify, every
acknowledged request must have its entry (entries are fsynced before the response starts), and a
few requests to the restarted server must work and extend the chain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "What was the most recent hemoglobin A1c?",
    "What is the patient's most recent blood pressure?",
    "What was the latest LDL cholesterol result?",
    "Which medications were prescribed for the patient?",
    "Does the patient have any allergies or intolerances?",
    "What was the most recent body weight?",
    "What was the latest hemoglobin value?",
    "Which immunizations did the patient receive?",
]


# ------------------------------------------------------------------------------------------- the server child


class FakeModel:
    """Cites the first record handle of its prompt after `latency` seconds (for --model fake)."""

    def __init__(self, latency: float):
        from clinqa.models.base import ModelInfo

        self.latency = latency
        self.info = ModelInfo(spec="fake", backend="fake", name="fake")

    def generate(self, prompts, config=None):
        import re

        time.sleep(self.latency)
        out = []
        for p in prompts:
            m = re.findall(r"\[((?!Patient/)[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})\]", p.split("END RECORD")[0])
            out.append(f"See [{m[0]}]." if m else "Not in the record.")
        return out


def child(config_path: str, model: str, fake_latency: float) -> None:
    """The server process: `serve(config)` for a real model spec, the same app over a fake model otherwise."""
    from clinqa.serve.app import create_app, install_log_redaction, serve
    from clinqa.serve.config import ServeConfig

    config = ServeConfig.load(config_path, env={})
    if model != "fake":
        serve(config)
        return
    import logging

    import uvicorn

    logging.basicConfig(level="WARNING")
    app = create_app(config, predictor=FakeModel(fake_latency))
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    )
    install_log_redaction()
    server.run()


# ------------------------------------------------------------------------------------------- harness


@dataclass
class Result:
    n: int
    patient: str
    question: str
    status: int  # 0 = no HTTP response (transport error)
    latency_s: float
    t_start: float
    error: str = ""


def server_memory_mb(pid: int) -> dict[str, float]:
    """The server process's resident memory now (VmRSS) and at its peak (VmHWM), from /proc (Linux)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, config_path: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            str(config_path),
            "--model",
            args.model,
            "--fake-latency",
            str(args.fake_latency),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready; see its log")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


MCQ_OPTIONS = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "alteplase"}


async def load(url: str, key: str, patients: list[str], clients: int, duration: float, timeout: float,
               tag: str, stop: asyncio.Event | None = None, results: list[Result] | None = None,
               endpoint: str = "ask") -> list[Result]:  # fmt: skip
    """Clients asking unique questions for `duration` s: record questions (`ask`), or multiple-choice
    questions scored by the letter method (`mcq`: one short forward pass per request)."""
    import httpx

    results = [] if results is None else results
    counter = iter(range(10**9))
    t_end = time.perf_counter() + duration
    stop = stop or asyncio.Event()

    async def client(c: int, http: httpx.AsyncClient) -> None:
        first = True
        while (first or time.perf_counter() < t_end) and not stop.is_set():
            first = False
            n = next(counter)
            patient = patients[n % len(patients)]
            question = f"{QUESTIONS[n % len(QUESTIONS)]} (ref {tag}-{n})"
            t0 = time.perf_counter()
            try:
                if endpoint == "mcq":
                    path, body = "/api/mcq", {"question": question, "options": MCQ_OPTIONS, "method": "letter"}
                else:
                    path, body = f"/api/patients/{patient}/ask", {"question": question}
                r = await http.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"})
                results.append(
                    Result(
                        n,
                        patient,
                        question,
                        r.status_code,
                        time.perf_counter() - t0,
                        t0,
                        "" if r.status_code < 300 else r.text[:200],
                    )
                )
            except httpx.HTTPError as e:
                results.append(Result(n, patient, question, 0, time.perf_counter() - t0, t0, type(e).__name__))
                if stop.is_set():
                    return
                await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return results


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def audit_check(audit_path: Path, results: list[Result], *, acknowledged_only: bool, action: str = "ask") -> dict:
    """Entries per request by question hash; the chain verified."""
    from clinqa.serve.audit import AuditLog, hash_question

    with AuditLog(audit_path) as log:
        verify = log.verify()
        entries = log.entries(action=action)
    by_hash: dict[str, int] = {}
    for e in entries:
        by_hash[e.question_hash] = by_hash.get(e.question_hash, 0) + 1
    acked = [r for r in results if 200 <= r.status < 300]
    answered = [r for r in results if r.status != 0]
    checked = acked if acknowledged_only else answered
    missing = [r.n for r in checked if by_hash.get(hash_question(r.question), 0) == 0]
    dupes = [r.n for r in results if by_hash.get(hash_question(r.question), 0) > 1]
    unacked_with_entry = [r.n for r in results if r.status == 0 and by_hash.get(hash_question(r.question), 0) == 1]
    return {
        "chain_ok": verify.ok,
        "chain_message": verify.message,
        "entries": verify.n,
        "ask_entries": len(entries),
        "checked_requests": len(checked),
        "missing": missing,
        "duplicates": dupes,
        "in_flight_at_kill_with_entry": unacked_with_entry,
    }


def summarise(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if 200 <= r.status < 300]
    lat = [r.latency_s for r in ok]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "latency_p50_s": round(percentile(lat, 50), 3),
        "latency_p95_s": round(percentile(lat, 95), 3),
        "latency_p99_s": round(percentile(lat, 99), 3),
        "error_kinds": sorted({f"{r.status} {r.error[:80]}" for r in results if not 200 <= r.status < 300}),
    }


def setup(workdir: Path, args) -> tuple[Path, str, list[str]]:
    from clinqa.records.synth import bundle_patient, synthesize_patients, write_patients
    from clinqa.serve.auth import KeyStore

    bundles = synthesize_patients(args.patients, seed=0)
    write_patients(workdir / "bundles", bundles)
    _, key = KeyStore(workdir / "keys.sqlite").create("load test", scopes="patient/*.read patient/*.ask")
    config = {
        "model": "default" if args.model == "fake" else args.model,
        "records": [str(workdir / "bundles")],
        "keys_db": str(workdir / "keys.sqlite"),
        "audit_db": str(workdir / "audit.sqlite"),
        "host": "127.0.0.1",
        "port": free_port(),
        "request_timeout_s": args.timeout,
        "max_new_tokens": args.max_new_tokens,
        "max_pending": max(4 * args.clients, 8),
        "log_level": "warning",
    }
    if getattr(args, "model_concurrency", None):
        config["model_concurrency"] = args.model_concurrency
    path = workdir / "serve.json"
    path.write_text(json.dumps(config, indent=1))
    return path, key, [bundle_patient(b)["id"] for b in bundles]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model spec for the server, or 'fake' (no model, fixed latency)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds during which clients start requests")
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=600.0, help="the server's request time budget (s)")
    ap.add_argument("--fake-latency", type=float, default=0.05)
    ap.add_argument(
        "--model-concurrency",
        type=int,
        default=None,
        help="the service's model calls at once with an openai: backend (default: the service's, 8)",
    )
    ap.add_argument("--no-fault", action="store_true", help="skip the SIGKILL run")
    ap.add_argument("--kill-after-acks", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.fake_latency)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clinqa-serve-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "model": args.model,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_new_tokens": args.max_new_tokens,
        "workdir": str(workdir),
    }
    config_path, key, patients = setup(workdir, args)
    config = json.loads(config_path.read_text())
    url = f"http://127.0.0.1:{config['port']}"
    server_log = workdir / "server.log"
    client_timeout = args.timeout + 30
    failures: list[str] = []

    # ---- load run
    proc = start_server(args, config_path, server_log)
    try:
        report["startup_s"] = round(wait_ready(proc, url, timeout=900), 1)
        memory_ready = server_memory_mb(proc.pid)
        print(
            f"server ready in {report['startup_s']} s ({args.model}); {args.clients} clients for {args.duration:.0f} s ...",
            flush=True,
        )
        t0 = time.perf_counter()
        results = asyncio.run(load(url, key, patients, args.clients, args.duration, client_timeout, "load"))
        wall = time.perf_counter() - t0
        memory_after = server_memory_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    report["load"] = summarise(results, wall)
    report["load"]["server_memory_mb"] = {
        "rss_ready": memory_ready.get("VmRSS"),
        "rss_after": memory_after.get("VmRSS"),
        "peak": memory_after.get("VmHWM"),
    }
    report["load"]["audit"] = audit_check(Path(config["audit_db"]), results, acknowledged_only=False)
    a = report["load"]["audit"]
    if report["load"]["errors"]:
        failures.append(f"load run: {report['load']['errors']} errors {report['load']['error_kinds']}")
    if not a["chain_ok"] or a["missing"] or a["duplicates"] or a["ask_entries"] != len(results):
        failures.append(f"load run audit: {a}")

    # ---- fault run
    if not args.no_fault:
        proc = start_server(args, config_path, server_log)
        wait_ready(proc, url, timeout=900)
        print(f"fault run: SIGKILL after {args.kill_after_acks} acknowledged responses ...", flush=True)

        async def fault() -> tuple[list[Result], float]:
            stop = asyncio.Event()
            results: list[Result] = []
            task = asyncio.create_task(
                load(url, key, patients, args.clients, 3600, client_timeout, "fault", stop, results)
            )
            t0 = time.perf_counter()
            while sum(1 for r in results if 200 <= r.status < 300) < args.kill_after_acks:
                if task.done():
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # let new requests get in flight
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.perf_counter() - t0
            stop.set()
            await task
            return results, killed_at

        fault_results, killed_at = asyncio.run(fault())
        proc.wait(timeout=30)
        acked = sum(1 for r in fault_results if 200 <= r.status < 300)
        in_flight = sum(1 for r in fault_results if r.status == 0)
        proc = start_server(args, config_path, server_log)
        try:
            wait_ready(proc, url, timeout=900)
            check = audit_check(Path(config["audit_db"]), fault_results, acknowledged_only=True)
            after = asyncio.run(load(url, key, patients, 1, 0.01, client_timeout, "after"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        from clinqa.serve.audit import AuditLog

        with AuditLog(config["audit_db"]) as log:
            final = log.verify()
        report["fault"] = {
            "killed_after_s": round(killed_at, 2),
            "acknowledged": acked,
            "lost_in_flight": in_flight,
            "audit_after_restart": check,
            "requests_after_restart": [r.status for r in after],
            "chain_after_restart_ok": final.ok,
            "entries_total": final.n,
        }
        if not check["chain_ok"] or check["missing"] or check["duplicates"] or not final.ok:
            failures.append(f"fault run audit: {check}")
        if not after or any(not 200 <= r.status < 300 for r in after):
            failures.append(f"after restart: {[(r.status, r.error) for r in after]}")

    return finish(report, failures, print_report, args.json)


def print_report(r: dict) -> None:
    load = r["load"]
    print(
        f"\nclinqa serve load test: {r['machine']}; load average before {tuple(round(x, 1) for x in r['load_average_before'])}"
    )
    print(
        f"model {r['model']}, max_new_tokens {r['max_new_tokens']}, {r['clients']} clients, {r['duration_s']:.0f} s "
        f"(server ready in {r.get('startup_s')} s)"
    )
    print(
        f"  requests {load['requests']}  ok {load['ok']}  errors {load['errors']}  "
        f"{load['requests_per_s']} req/s over {load['wall_s']} s"
    )
    print(f"  latency p50 {load['latency_p50_s']} s  p95 {load['latency_p95_s']} s  p99 {load['latency_p99_s']} s")
    m = load.get("server_memory_mb") or {}
    if m.get("peak"):
        print(
            f"  server memory: {m['rss_ready']} MB resident when ready, {m['rss_after']} MB after the load, peak {m['peak']} MB"
        )
    a = load["audit"]
    print(
        f"  audit: {a['ask_entries']} ask entries for {a['checked_requests']} requests, missing {len(a['missing'])}, "
        f"duplicated {len(a['duplicates'])}; chain: {a['chain_message']}"
    )
    if "fault" in r:
        f = r["fault"]
        c = f["audit_after_restart"]
        print(
            f"  fault: SIGKILL at {f['killed_after_s']} s with {f['acknowledged']} acknowledged and "
            f"{f['lost_in_flight']} in flight; after restart: chain {'ok' if c['chain_ok'] else 'BROKEN'} "
            f"({c['chain_message']}), acknowledged without entry {len(c['missing'])}, duplicated {len(c['duplicates'])}, "
            f"in-flight requests that had been audited {len(c['in_flight_at_kill_with_entry'])}; "
            f"requests after restart {f['requests_after_restart']}, final chain "
            f"{'ok' if f['chain_after_restart_ok'] else 'BROKEN'} ({f['entries_total']} entries)"
        )
    print("PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"]))


if __name__ == "__main__":
    sys.exit(main())
