"""`clinqa serve` with a local model: requests/s with dynamic batching of concurrent requests on vs off.

    python benchmarks/serve_batching.py                          # embedded model on the CPU, 4 clients, /ask
    python benchmarks/serve_batching.py --endpoint mcq --clients 8  # short requests: letter scoring
    python benchmarks/serve_batching.py --device cuda --clients 16 --max-batch 16 --json gpu_batching.json

Two real server processes (benchmarks/serve_load.py's harness) on the same model and synthetic patients,
one with ``local_batching = "off"`` (one model call at a time: the CPU default) and one with ``"on"``
(the GPU default; concurrent requests' generate calls become one batched call, clinqa.serve.coalesce).
Both are started once and stay up; the load alternates between them for --rounds rounds of --duration
seconds each (off first in odd rounds, on first in even ones, so drift in the machine's load falls on
both alike). N clients ask record questions (``--endpoint ask``: BM25 selection, then stage-2 generation of
--max-new-tokens, batched as generate calls) or multiple-choice questions (``--endpoint mcq``: letter
scoring, one short forward pass per request, batched as next_token_logprobs calls). Reported:
requests/s per round and mode, the per-round ratio on/off with its geometric mean, a 95 % t-interval
over rounds and a paired t-test on log requests/s, latency percentiles, errors (must be zero) and the
audit check (every request audited exactly once, chain verified); and how many model calls the
batching server made for how many requests (its log at shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402
from _common import finish, machine  # noqa: E402

MODES = ("off", "on")


def start(mode: str, args, workdir: Path) -> dict:
    sub = workdir / f"batching-{mode}"
    sub.mkdir(parents=True, exist_ok=True)
    sargs = SimpleNamespace(
        model=args.model,
        patients=args.patients,
        timeout=args.timeout,
        max_new_tokens=args.max_new_tokens,
        clients=args.clients,
        fake_latency=0.0,
        model_concurrency=args.clients,
    )
    config_path, key, patients = sl.setup(sub, sargs)
    config = json.loads(config_path.read_text())
    config.update(local_batching=mode, batch_window_ms=args.window_ms, max_batch=args.max_batch, log_level="info")
    config_path.write_text(json.dumps(config, indent=1))
    proc = sl.start_server(sargs, config_path, sub / "server.log")
    url = f"http://127.0.0.1:{config['port']}"
    return {"proc": proc, "url": url, "key": key, "patients": patients, "config": config, "log": sub / "server.log"}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95 % t-interval for the mean (nan bounds with fewer than 2 values)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def batching_line(log_path: Path) -> str:
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    found = re.findall(r"batching: .*", text)
    return found[-1] if found else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="local model spec served by both servers")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, auto (sets CLINQA_DEVICE for the servers)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, ... (sets CLINQA_DTYPE for the servers)")
    ap.add_argument("--endpoint", choices=("ask", "mcq"), default="ask", help="the requests the clients send")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="intra-op threads of the servers' torch (sets OMP_NUM_THREADS; default: torch's own choice)",
    )
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (also the servers' model_concurrency)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per round and mode")
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=5.0, help="the batching server's batch_window_ms")
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's max_batch")
    ap.add_argument("--timeout", type=float, default=600.0, help="the servers' request time budget (s)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.device:
        os.environ["CLINQA_DEVICE"] = args.device
    if args.dtype:
        os.environ["CLINQA_DTYPE"] = args.dtype
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.torch_threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clinqa-serve-batching-"))
    report: dict = {
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "model": args.model,
        "device": args.device or os.environ.get("CLINQA_DEVICE") or "auto",
        "endpoint": args.endpoint,
        "torch_threads": args.torch_threads or "default",
        "clients": args.clients,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "max_new_tokens": args.max_new_tokens,
        "window_ms": args.window_ms,
        "max_batch": args.max_batch,
        "workdir": str(workdir),
    }
    servers = {}
    try:
        for mode in MODES:  # one at a time: two model loads at once would slow both
            servers[mode] = start(mode, args, workdir)
            report[f"startup_{mode}_s"] = round(sl.wait_ready(servers[mode]["proc"], servers[mode]["url"], 900), 1)
        print(
            f"servers ready ({args.model}, device {report['device']}); {args.rounds} rounds x {args.duration:.0f} s "
            f"per mode, {args.clients} clients ...",
            flush=True,
        )
        results: dict[str, list] = {m: [] for m in MODES}
        per_round: dict[str, list[float]] = {m: [] for m in MODES}
        walls = dict.fromkeys(MODES, 0.0)
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                s = servers[mode]
                t0 = time.perf_counter()
                got = asyncio.run(
                    sl.load(
                        s["url"],
                        s["key"],
                        s["patients"],
                        args.clients,
                        args.duration,
                        args.timeout + 30,
                        f"{mode}{r}",
                        endpoint=args.endpoint,
                    )  # fmt: skip
                )
                wall = time.perf_counter() - t0
                results[mode] += got
                walls[mode] += wall
                per_round[mode].append(sl.summarise(got, wall)["requests_per_s"])
                print(
                    f"  round {r + 1} batching {mode:3s}: {per_round[mode][-1]} req/s ({len(got)} requests)", flush=True
                )
    finally:
        for s in servers.values():
            s["proc"].send_signal(signal.SIGTERM)
        for s in servers.values():
            s["proc"].wait(timeout=120)
    failures = []
    for mode in MODES:
        summary = sl.summarise(results[mode], walls[mode])
        summary["requests_per_s_rounds"] = per_round[mode]
        summary["audit"] = a = sl.audit_check(
            Path(servers[mode]["config"]["audit_db"]), results[mode], acknowledged_only=False, action=args.endpoint
        )
        summary["server_batching_log"] = batching_line(servers[mode]["log"])
        report[mode] = summary
        if summary["errors"]:
            failures.append(f"batching {mode}: {summary['errors']} errors {summary['error_kinds']}")
        if not a["chain_ok"] or a["missing"] or a["duplicates"] or a["ask_entries"] != len(results[mode]):
            failures.append(f"batching {mode} audit: {a}")
    logs = [math.log(on / off) for on, off in zip(per_round["on"], per_round["off"]) if on > 0 and off > 0]
    mean, lo, hi = t_interval(logs) if logs else (float("nan"),) * 3
    from scipy import stats

    p = float(stats.ttest_1samp(logs, 0.0).pvalue) if len(logs) > 1 else float("nan")
    report["ratio"] = {
        "per_round": [round(math.exp(v), 3) for v in logs],
        "geometric_mean": round(math.exp(mean), 3),
        "ci95": [round(math.exp(lo), 3), round(math.exp(hi), 3)],
        "paired_t_p": p,
        "n_rounds": len(logs),
    }
    return finish(report, failures, print_report, args.json)


def print_report(r: dict) -> None:
    print(
        f"\nclinqa serve, local batching on vs off: {r['machine']}; load average before "
        f"{tuple(round(x, 1) for x in r['load_average_before'])}, after {tuple(round(x, 1) for x in r['load_average_after'])}"
    )
    print(
        f"model {r['model']} on {r['device']} (torch threads: {r['torch_threads']}), /{r['endpoint']} requests, {r['clients']} clients, max_new_tokens {r['max_new_tokens']}, "
        f"{r['rounds']} rounds x {r['duration_s']:.0f} s per mode; batching window {r['window_ms']} ms, "
        f"max_batch {r['max_batch']}"
    )
    for mode in MODES:
        s = r[mode]
        a = s["audit"]
        print(
            f"  batching {mode:3s}: req/s per round {s['requests_per_s_rounds']}; {s['ok']} ok, {s['errors']} errors; "
            f"latency p50 {s['latency_p50_s']} s p95 {s['latency_p95_s']} s; audit: {a['ask_entries']} entries for "
            f"{a['checked_requests']} requests, missing {len(a['missing'])}, duplicated {len(a['duplicates'])}, "
            f"chain {'ok' if a['chain_ok'] else 'BROKEN'}"
        )
        if s["server_batching_log"]:
            print(f"    server: {s['server_batching_log']}")
    q = r["ratio"]
    print(
        f"  ratio on/off: {q['geometric_mean']}x (geometric mean over {q['n_rounds']} rounds, 95 % CI "
        f"{q['ci95'][0]}-{q['ci95'][1]}, paired t-test on log req/s p={q['paired_t_p']:.3g}); per round {q['per_round']}"
    )
    print("PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"]))


if __name__ == "__main__":
    sys.exit(main())
