"""Train a LoRA adapter on the embedded model (SmolLM2-135M-Instruct) with the bundled cardiology
questions, on this machine's CPU, and report what it costs.

    python benchmarks/lora_train.py [--epochs 1] [--out DIR] [--rank 32] [--batch-size 8] [--threads N] [--from-spec]
                                    [--data SPEC --limit N] [--device D] [--dtype T]
                                    [--gradient-checkpointing | --compare-checkpointing | --compare-old [--old-rev REV]]

Prints tokens/second (real tokens through forward+backward per second of optimizer-step time),
wall seconds, peak resident memory, trainable parameters, and the validation loss (mean per answer
token, S-MedQA defaults otherwise) before and after training. Without --out the adapter goes to a
temporary folder that is removed at the end; with --out it stays (re-running resumes or returns it).

--data trains on other questions (e.g. PubMedQA, whose abstracts make 300-500-token examples)
instead of the bundled cardiology ones. --compare-checkpointing trains the same adapter twice, in two
child processes (peak memory is per process), without and with gradient checkpointing, and prints
the ratios of peak memory and training time and whether the weights agree. --compare-old trains the
same adapter twice, in two child processes, with the hand-written torch loop clinqa used before it
moved to transformers' Trainer (read from git: `git show REV:src/clinqa/adapt/lora.py`, default REV
9746f29) and with the Trainer, and prints the ratios of tokens/second, training time and peak memory
and both validation losses (the two differ in schedule details and data order, so their weights are
not expected to agree). --device/--dtype set LoraTrainConfig.device/dtype (default auto: a CUDA GPU in
bf16 when present).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", type=Path, help="keep the adapter here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's choice; 1 is much faster when other processes share the cores)",
    )
    ap.add_argument(
        "--from-spec",
        action="store_true",
        help="pass the spec string 'default' (weights loaded from its folder) instead of the loaded model (deep-copied)",
    )
    ap.add_argument(
        "--data", help="training questions (a data spec or file); default: the bundled cardiology questions"
    )
    ap.add_argument("--limit", type=int, help="with --data: the first N questions")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--compare-checkpointing", action="store_true", help="train twice (plain, checkpointed) and print ratios"
    )
    ap.add_argument("--device", help="LoraTrainConfig.device (default: auto)")
    ap.add_argument("--dtype", help="LoraTrainConfig.dtype (default: auto)")
    ap.add_argument(
        "--compare-old",
        action="store_true",
        help="train twice (the old hand-written loop, the Trainer) and print ratios",
    )
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision holding the old loop (with --compare-old)")
    ap.add_argument("--impl", choices=("trainer", "old"), default="trainer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare_checkpointing:
        return compare_checkpointing(args)
    if args.compare_old:
        return compare_old(args)

    import torch

    if args.impl == "old":
        LoraTrainConfig, finetune = old_loop(args.old_rev)
    else:
        from clinqa.adapt.lora import LoraTrainConfig, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    from clinqa.data.loaders import load_questions
    from clinqa.models import load_base_model

    t0 = time.perf_counter()
    # the shared, cached predictor other commands use; finetune trains a deep copy and leaves it alone
    base = load_base_model("default")
    if args.data:
        questions = load_questions(args.data, limit=args.limit).questions
    else:
        questions = load_questions("bundled", specialties=["cardiology"]).questions
    config = LoraTrainConfig(
        epochs=args.epochs,
        rank=args.rank,
        batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        **({} if args.impl == "old" else {"device": args.device, "dtype": args.dtype}),
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="clinqa-lora-bench-")) / "adapter"

    def progress(step: int, total: int, loss: float | None) -> None:
        if loss is not None:
            print(f"  step {step}/{total}  loss {loss:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(
        f"{machine()}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}; base {base.info.name} ({base.info.n_params / 1e6:.0f}M params); "
        f"{len(questions)} {'questions of ' + args.data if args.data else 'cardiology questions'}; {args.epochs} epoch(s)"
        f"{'; gradient checkpointing' if args.gradient_checkpointing else ''}",
        flush=True,
    )
    t1 = time.perf_counter()
    result = finetune("default" if args.from_spec else base, questions, config, out, progress=progress)
    wall = time.perf_counter() - t1
    m = result.metadata
    numbers = {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg()[0],
        "base": m["base"]["name"],
        "n_train": m["n_train"],
        "n_val": m["n_val"],
        "epochs_run": m["epochs_run"],
        "steps": m["steps"],
        "rank": m["config"]["rank"],
        "trainable_params": m["trainable_params"],
        "quantization": m["quantization"],
        "implementation": args.impl,
        "device": m.get("device"),
        "precision": m.get("precision", "float32"),
        "peak_gpu_memory_mb": m.get("peak_gpu_memory_mb"),
        "train_tokens": m["train_tokens"],
        "tokens_per_second": m["tokens_per_second"],
        "train_seconds": m["train_seconds"],
        "finetune_call_seconds": round(wall, 2),
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "val_loss_before": m["initial_val_loss"],
        "val_loss_after": m["best_val_loss"],
        "history": m["history"],
        "cached": result.cached,
    }
    print(
        f"tokens/second {numbers['tokens_per_second']}  train seconds {numbers['train_seconds']}  "
        f"(whole finetune call {numbers['finetune_call_seconds']} s)  peak memory {numbers['peak_memory_mb']} MB"
    )
    print(
        f"trainable params {numbers['trainable_params']:,}  quantization {numbers['quantization']}  "
        f"device {numbers['device']} {numbers['precision']}  "
        f"val loss {numbers['val_loss_before']:.4f} -> {numbers['val_loss_after']:.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)


OLD_REV = "9746f29"  # the last commit whose src/clinqa/adapt/lora.py had the hand-written training loop


def old_loop(rev: str):
    """(LoraTrainConfig, finetune) of the old hand-written loop, imported from git history."""
    import importlib.util
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "-C", str(repo), "show", f"{rev}:src/clinqa/adapt/lora.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"--impl old needs git and revision {rev} of this repository: {exc}") from exc
    path = Path(tempfile.mkdtemp(prefix="clinqa-old-lora-")) / "clinqa_old_lora.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("clinqa_old_lora", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["clinqa_old_lora"] = module
    spec.loader.exec_module(module)
    return module.LoraTrainConfig, module.finetune


def _passed_args(drop: tuple[str, ...], drop_with_value: tuple[str, ...]) -> list[str]:
    passed, out, skip = sys.argv[1:], [], False
    for a in passed:
        if skip:
            skip = False
        elif a in drop_with_value:
            skip = True
        elif a not in drop:
            out.append(a)
    return out


def compare_old(args) -> None:
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="clinqa-lora-old-"))
    passed = _passed_args(("--compare-old",), ("--out", "--json", "--device", "--dtype"))
    results = {}
    try:
        for name, extra in (("old", ["--impl", "old"]), ("trainer", [])):
            print(f"--- {name}", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *passed,
                    *extra,
                    "--out",
                    str(tmp / name),
                    "--json",
                    str(tmp / f"{name}.json"),
                ],
                check=True,
            )
            results[name] = json.loads((tmp / f"{name}.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = results["old"], results["trainer"]
    print(
        f"Trainer vs the old loop (same questions, config and machine; {a['steps']} vs {b['steps']} steps): "
        f"tokens/second {a['tokens_per_second']} -> {b['tokens_per_second']} ({b['tokens_per_second'] / a['tokens_per_second']:.2f}x), "
        f"training time {a['train_seconds']:.1f} -> {b['train_seconds']:.1f} s ({b['train_seconds'] / a['train_seconds']:.2f}x), "
        f"peak memory {a['peak_memory_mb']:.0f} -> {b['peak_memory_mb']:.0f} MB ({b['peak_memory_mb'] / a['peak_memory_mb']:.2f}x); "
        f"validation loss after: {a['val_loss_after']:.4f} (old) vs {b['val_loss_after']:.4f} (Trainer), "
        f"before {a['val_loss_before']:.4f}"
    )


def compare_checkpointing(args) -> None:
    import subprocess

    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="clinqa-lora-ckpt-"))
    passed = [a for a in sys.argv[1:] if a != "--compare-checkpointing"]
    passed = [a for i, a in enumerate(passed) if a != "--out" and (i == 0 or passed[i - 1] != "--out")]
    results = {}
    try:
        for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
            print(f"--- {name}", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *passed,
                    *extra,
                    "--out",
                    str(tmp / name),
                    "--json",
                    str(tmp / f"{name}.json"),
                ],
                check=True,
            )
            results[name] = json.loads((tmp / f"{name}.json").read_text())
        w1 = load_file(str(tmp / "plain" / "adapter_model.safetensors"))
        w2 = load_file(str(tmp / "checkpointed" / "adapter_model.safetensors"))
        max_diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = results["plain"], results["checkpointed"]
    print(
        f"gradient checkpointing: peak memory {a['peak_memory_mb']:.0f} -> {b['peak_memory_mb']:.0f} MB "
        f"({a['peak_memory_mb'] / b['peak_memory_mb']:.2f}x less), training time {a['train_seconds']:.0f} -> "
        f"{b['train_seconds']:.0f} s ({b['train_seconds'] / a['train_seconds']:.2f}x), largest weight difference {max_diff:.1e}"
    )


if __name__ == "__main__":
    main()
