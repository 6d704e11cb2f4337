"""The openai: backend and `clinqa serve` at cluster speed, against a fake OpenAI-compatible server.

The fake server (tests/fake_openai.py) runs on 127.0.0.1 with a fixed latency per request (default
100 ms, whatever the request holds: a stand-in for a vLLM cluster that is never the bottleneck), and
answers deterministically from the prompt text. In this one invocation:

1. `eval --method letter` (the harness the CLI runs, batch size 16) on N bundled questions through
   - serial:   openai:URL#fake@concurrency=1,batch=1   (one prompt per request, one at a time: the old backend)
   - parallel: openai:URL#fake@batch=1                (32 requests in flight, one prompt each)
   - default:  openai:URL#fake                        (32 in flight, up to 16 prompts per request)
   reporting seconds, the ratio to serial, and whether the per-question predictions are identical.
2. `clinqa serve` (a real server process, benchmarks/serve_load.py's harness) with the remote backend,
   C clients asking for D seconds, model_concurrency=1 vs the default 8: requests/s and their ratio,
   errors, and the audit check (one entry per request).

    python benchmarks/remote_concurrency.py [--questions 200] [--latency 0.1] [--clients 16] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_fake():
    spec = importlib.util.spec_from_file_location("fake_openai", HERE.parent / "tests" / "fake_openai.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_openai"] = module
    spec.loader.exec_module(module)
    return module


def timed_eval(spec: str, questions, out: Path, server) -> tuple[dict, float, int]:
    from clinqa.adapt import load_predictor
    from clinqa.evaluate import EvalConfig, evaluate

    predictor = load_predictor(spec)
    predictor.capabilities()  # the one-time probe, outside the clock and the counts
    server.reset_counters()
    config = EvalConfig(model=spec, data="bundled", method="letter", limit=len(questions))
    t = time.perf_counter()
    run = evaluate(predictor, questions, config, out, batch_size=16)
    seconds = time.perf_counter() - t
    return {s.question_id: s.pred for s in run.samples()}, seconds, predictor.config.concurrency


def eval_part(server, args, workdir: Path) -> dict:
    from clinqa.evaluate import EvalConfig, load_data

    questions, _ = load_data(EvalConfig(model="x", data="bundled", method="letter", limit=args.questions))
    base = f"openai:{server.url}#fake"
    runs = {}
    for name, spec in (("serial", f"{base}@concurrency=1,batch=1"), ("parallel", f"{base}@batch=1"), ("default", base)):
        preds, seconds, conc = timed_eval(spec, questions, workdir / f"eval-{name}", server)
        n_req = sum(1 for path, _ in server.requests if path.endswith("/completions"))
        runs[name] = {
            "spec": spec.replace(server.url, "URL"),
            "seconds": round(seconds, 2),
            "requests": n_req,
            "max_in_flight": server.max_in_flight,
            "preds": preds,
        }
        print(
            f"  eval {name:8s} {seconds:6.2f} s  {n_req:4d} requests, at most {server.max_in_flight} in flight",
            flush=True,
        )
    serial = runs["serial"]
    out = {"questions": len(questions)}
    for name, r in runs.items():
        out[name] = {k: v for k, v in r.items() if k != "preds"}
        out[name]["speedup_vs_serial"] = round(serial["seconds"] / r["seconds"], 1)
        out[name]["identical_predictions"] = r["preds"] == serial["preds"]
        out[name]["unanswered"] = sum(1 for p in r["preds"].values() if p is None)
    return out


def serve_part(server, args, workdir: Path) -> dict:
    import serve_load as sl

    out = {}
    for name, conc in (("one_worker", 1), ("default", 8)):
        sub = workdir / f"serve-{name}"
        sub.mkdir()
        sargs = SimpleNamespace(
            model=f"openai:{server.url}#fake",
            patients=4,
            timeout=120.0,
            max_new_tokens=32,
            clients=args.clients,
            fake_latency=0.0,
            model_concurrency=conc,
        )
        config_path, key, patients = sl.setup(sub, sargs)
        config = json.loads(config_path.read_text())
        url = f"http://127.0.0.1:{config['port']}"
        proc = sl.start_server(sargs, config_path, sub / "server.log")
        try:
            sl.wait_ready(proc, url, timeout=300)
            server.reset_counters()
            t0 = time.perf_counter()
            results = asyncio.run(sl.load(url, key, patients, args.clients, args.duration, 150, name))
            wall = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        summary = sl.summarise(results, wall)
        summary["audit"] = sl.audit_check(Path(config["audit_db"]), results, acknowledged_only=False)
        summary["model_concurrency"] = conc
        summary["server_max_in_flight"] = server.max_in_flight
        out[name] = summary
        print(
            f"  serve {name:10s} model_concurrency={conc}: {summary['requests_per_s']} req/s, {summary['errors']} errors, "
            f"p50 {summary['latency_p50_s']} s, at most {server.max_in_flight} model requests in flight",
            flush=True,
        )
    out["speedup"] = round(out["default"]["requests_per_s"] / max(out["one_worker"]["requests_per_s"], 1e-9), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.1, help="the fake server's seconds per request")
    ap.add_argument(
        "--serve-latency",
        type=float,
        default=None,
        help="the fake server's latency for the serve part (default: --latency)",
    )
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of the service")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per service run")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    fake = load_fake()
    workdir = Path(tempfile.mkdtemp(prefix="clinqa-remote-"))
    report: dict = {"machine": machine(), "load_average_before": os.getloadavg(), "latency_s": args.latency}
    failures = []
    with fake.FakeOpenAI(latency=args.latency) as server:
        print(f"fake OpenAI-compatible server at {server.url}", flush=True)
        if not args.skip_eval:
            report["eval"] = eval_part(server, args, workdir)
        if not args.skip_serve:
            server.latency = report["serve_latency_s"] = args.serve_latency or args.latency
            report["serve"] = sv = serve_part(server, args, workdir)
    report["load_average_after"] = os.getloadavg()

    print(
        f"\nopenai: backend and serve vs a {args.latency * 1000:.0f} ms fake server; {report['machine']}; "
        f"load average {tuple(round(x, 1) for x in report['load_average_before'])}"
    )
    if "eval" in report:
        ev = report["eval"]
        print(f"eval --method letter, {ev['questions']} bundled questions, batch size 16:")
        for name in ("serial", "parallel", "default"):
            r = ev[name]
            print(
                f"  {name:8s} {r['seconds']:6.2f} s  {r['requests']:4d} requests  {r['speedup_vs_serial']:5.1f}x serial  "
                f"identical predictions: {r['identical_predictions']}  ({r['spec']})"
            )
            if not r["identical_predictions"]:
                failures.append(f"eval {name}: predictions differ from serial")
        if ev["default"]["speedup_vs_serial"] < 10:
            failures.append(f"eval speedup {ev['default']['speedup_vs_serial']}x < 10x")
    if "serve" in report:
        print(
            f"serve, {args.clients} clients for {args.duration:.0f} s, remote backend answering in "
            f"{report['serve_latency_s'] * 1000:.0f} ms:"
        )
        for name in ("one_worker", "default"):
            r = sv[name]
            a = r["audit"]
            print(
                f"  model_concurrency={r['model_concurrency']}: {r['requests_per_s']} req/s ({r['ok']} ok, {r['errors']} errors), "
                f"p50 {r['latency_p50_s']} s; audit: {a['ask_entries']} entries for {a['checked_requests']} requests, "
                f"missing {len(a['missing'])}, duplicated {len(a['duplicates'])}, chain {'ok' if a['chain_ok'] else 'BROKEN'}"
            )
            if r["errors"] or a["missing"] or a["duplicates"] or not a["chain_ok"]:
                failures.append(f"serve {name}: errors or audit problems")
        print(f"  ratio {sv['speedup']}x requests/s (goal >= 5x)")
        if sv["speedup"] < 5:
            failures.append(f"serve speedup {sv['speedup']}x < 5x")
    report["failures"] = failures
    if args.json:
        write_json(args.json, report)
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
