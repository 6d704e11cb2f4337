"""Helpers shared by the benchmark scripts: data selection, timing, machine facts."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PUBMEDQA = SHARED / "pubmedqa" / "ori_pqal.json"
SYNTHEA = SHARED / "fhir" / "synthea-r4"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def matmul_peak_gflops(n: int = 2048, repeats: int = 8) -> float:
    """fp32 matmul throughput of this machine with torch's default threads (best of `repeats`)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def finish(report: dict, failures: list[str], print_report, json_path: Path | None) -> int:
    """End a benchmark: load average after, pass/fail, the printed report and the optional JSON; exit code."""
    report["load_average_after"] = os.getloadavg()
    report["ok"] = not failures
    report["failures"] = failures
    print_report(report)
    if json_path:
        write_json(json_path, report)
    return 0 if not failures else 1


def step(name: str, args: list[str], out: Path, done: Path | None = None) -> None:
    """Run one clinqa command of a study (each resumes by itself), logging its wall time to
    OUT/steps.jsonl; skip it when its `done` file exists. A failed command stops the study."""
    import subprocess
    import sys

    if done is not None and done.exists():
        print(f"[{name}] done already ({done})", flush=True)
        return
    print(f"[{name}] clinqa {' '.join(args)}", flush=True)
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "clinqa.cli", *args])
    with open(out / "steps.jsonl", "a") as fh:
        fh.write(
            json.dumps(
                {
                    "step": name,
                    "seconds": round(time.time() - t, 1),
                    "rc": r.returncode,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
    if r.returncode != 0:
        raise SystemExit(f"[{name}] failed (exit {r.returncode}); fix and run the study again: it resumes")


def step_seconds(out: Path) -> dict[str, float]:
    """Wall seconds per step name, summed over every invocation logged in OUT/steps.jsonl."""
    seconds: dict[str, float] = {}
    for line in open(out / "steps.jsonl"):
        s = json.loads(line)
        seconds[s["step"]] = seconds.get(s["step"], 0.0) + s["seconds"]
    return seconds
