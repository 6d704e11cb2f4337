"""The openai: backend against a local llama.cpp server vs the local torch backend, same model, same questions.

Starts `python -m llama_cpp.server` on a free loopback port serving the embedded GGUF (the file
`default` dequantises), then scores N bundled questions with the letter method through
`openai:http://127.0.0.1:PORT/v1#smollm2` and through `default`, in this one invocation. Prints
seconds per question for each (model load and server start excluded), their ratio, and how many
per-question predictions agree (Q4_1 llama.cpp kernels vs dequantised fp32: close, not identical).

    python benchmarks/openai_backend.py [--questions 40] [--threads 2]

Needs the llamacpp extra: pip install -e '.[llamacpp]'.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ALIAS = "smollm2"


def start_server(gguf: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's OpenAI-compatible server on a free loopback port; returns it once /v1/models answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"llama.cpp server did not start; its log:\n{log.read_text()[-2000:]}")


def timed_eval(spec: str, questions, config, out: Path) -> tuple[dict, float]:
    """Per-question predictions and scoring seconds per question (the model is loaded before the clock starts)."""
    from clinqa.adapt import load_predictor
    from clinqa.evaluate import evaluate

    predictor = load_predictor(spec)
    t = time.perf_counter()
    run = evaluate(predictor, questions, replace(config, model=spec), out)
    seconds = time.perf_counter() - t
    return {s.question_id: s.pred for s in run.samples()}, seconds / len(questions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=40, help="bundled questions to score")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both backends")
    args = ap.parse_args()
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        sys.exit("llama_cpp.server is not installed: pip install -e '.[llamacpp]'")

    import torch

    from clinqa.evaluate import EvalConfig, load_data
    from clinqa.models.embedded import embedded_gguf, embedded_model_dir

    torch.set_num_threads(args.threads)
    embedded_model_dir()  # convert once, outside the timings
    config = EvalConfig(model="", data="bundled", method="letter", limit=args.questions)
    questions, _ = load_data(config)
    tmp = Path(tempfile.mkdtemp(prefix="clinqa-bench-"))
    proc, url = start_server(embedded_gguf(), args.threads, tmp / "server.log")
    try:
        remote, t_remote = timed_eval(f"openai:{url}#{ALIAS}", questions, config, tmp / "remote")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local, t_local = timed_eval("default", questions, config, tmp / "local")
    n = len(questions)
    gold = {q.id: q.answer for q in questions}
    same = sum(remote[q] == local[q] for q in local)
    acc = {name: sum(p[q] == gold[q] for q in gold) / n for name, p in (("openai", remote), ("default", local))}
    print(f"machine: {machine()}; {args.threads} threads per backend; {n} bundled questions, letter method")
    print(
        f"openai: (llama.cpp server, Q4_1) {t_remote:.3f} s/question; default (torch fp32) {t_local:.3f} s/question "
        f"-> ratio {t_remote / t_local:.2f}x"
    )
    print(f"identical predictions: {same}/{n}; accuracy openai {acc['openai']:.3f}, default {acc['default']:.3f}")


if __name__ == "__main__":
    main()
