"""Scoring and LoRA training speed of real model architectures on a GPU, against lm-eval's way of
doing the same work in the same process.

    python benchmarks/gpu_speed.py                          # CUDA: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B shapes
    python benchmarks/gpu_speed.py --device cpu --tiny      # smoke mode: tiny configs, a few prompts (tested in CI)

Models are built from their published configs with random weights (nothing is downloaded; scoring
cost does not depend on the weights); the tokenizer is the embedded model's. Prompts are synthetic
MedQA-shaped questions (about 200 tokens, 4 options), formatted exactly as `clinqa eval` does
(`letter_prompt`, `cloze_prompt`). For each model, in --dtype (bf16 by default):

- clinqa letter: `LocalModel.next_token_logprobs` (one forward per question, LM head at the last token)
- clinqa option: `LocalModel.score_continuations` (question and its 4 options packed into one sequence)
- baseline (lm-eval's way, lm-evaluation-harness's HF backend): one right-padded forward per
  (question, option) pair, full-vocabulary log-softmax at every position, for both methods.
  Ratio = clinqa questions/s / baseline questions/s; the two must pick the same answers (agreement printed).
- MFU: model FLOPs of the useful (non-pad) tokens (2 x block parameters + attention + the LM head
  where it is applied) per second, over this GPU's measured bf16 matmul peak.

Then LoRA training on the 1B config (--lora-model) through `clinqa.adapt.lora.finetune`: tokens/s
and peak device memory. Results go to stdout and --json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Published sizes (config.json of HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B).
CONFIGS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

WORDS = (
    "patient presents with fever cough dyspnea chest pain history hypertension diabetes smoking examination "
    "reveals tachycardia murmur crackles oedema jaundice abdominal tenderness laboratory studies show elevated "
    "troponin creatinine leukocytosis anemia platelet count serum sodium potassium bilirubin radiograph "
    "consolidation effusion cardiomegaly electrocardiogram elevation depression which following most likely "
    "diagnosis appropriate next step management year old woman man week days months ago medication"
).split()
OPTIONS = (
    "Acute myocardial infarction",
    "Community acquired pneumonia",
    "Pulmonary embolism",
    "Congestive heart failure",
    "Aortic dissection",
    "Acute pancreatitis",
    "Intravenous heparin",
    "Oral amoxicillin",
    "Emergency surgery",
    "Observation and reassurance",
    "Diuretic therapy",
    "Cardiac catheterization",
    "Lumbar puncture",
    "Chest CT",
)


def synthetic_questions(n: int, words: int, seed: int = 0):
    """MedQA-shaped questions: a vignette of `words` words (~1.3 tokens each) and 4 options."""
    from clinqa.data.schema import Question

    rng = random.Random(seed)
    out = []
    for i in range(n):
        stem = (
            f"A {rng.randint(18, 90)}-year-old "
            + " ".join(rng.choice(WORDS) for _ in range(words))
            + ". What is the most likely diagnosis?"
        )
        opts = rng.sample(OPTIONS, 4)
        out.append(Question(id=f"s{i}", question=stem, options=dict(zip("ABCD", opts)), answer=rng.choice("ABCD")))
    return out


def build_model(name: str, tokenizer, device: torch.device, dtype: torch.dtype, tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clinqa.models.local import LocalModel

    kw = {**CONFIGS[name], **(TINY if tiny else {})}
    if tiny:
        kw["vocab_size"] = len(tokenizer)
    kw["vocab_size"] = max(kw["vocab_size"], len(tokenizer))
    cfg = LlamaConfig(
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kw,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return LocalModel.from_objects(model.eval(), tokenizer, spec=name, name=name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best / 1e12


def block_params(model) -> int:
    """Parameters of the decoder blocks (embeddings and LM head excluded: counted where applied)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def flops(model, seq_lens, head_positions: int) -> float:
    """Forward FLOPs: 2 x block parameters per token, causal attention (2 x 2 x layers x hidden x
    context / 2 per token), and 2 x hidden x vocab per position the LM head is applied at."""
    cfg = model.config
    n_block = block_params(model)
    f = 0.0
    for L in seq_lens:
        f += 2 * n_block * L + 2 * cfg.num_hidden_layers * cfg.hidden_size * L * L
    return f + 2 * cfg.hidden_size * cfg.vocab_size * head_positions


@torch.inference_mode()
def baseline_scores(pm, pairs, batch_size: int) -> list[float]:
    """lm-eval HF's loglikelihood: per (context, continuation) one sequence (context + continuation
    but its last token), right-padded batches sorted longest first, full-vocabulary log-softmax at
    every position, then the continuation tokens' log-probabilities summed."""
    enc = [pm.encode_pair(c, x) for c, x in pairs]
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    out = [0.0] * len(enc)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [(enc[i][0] + enc[i][1])[:-1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(idx), width), pm.pad_id, dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, : len(q)] = torch.tensor(q)
        logits = pm.model(input_ids=ids.to(pm.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # every position, whole vocabulary
        for r, i in enumerate(idx):
            ctx, cont = enc[i]
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=logp.device)
            out[i] = float(logp[r, pos, torch.tensor(cont, device=logp.device)].sum())
    return out


def timed(device, fn):
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t


def bench_scoring(name, pm, questions, peak, device, baseline_n, baseline_batch) -> dict:
    import numpy as np

    from clinqa.evaluate.prompts import cloze_prompt, letter_prompt

    letters = [" A", " B", " C", " D"]
    ltexts = [letter_prompt(q, q.options) for q in questions]
    groups = [(cloze_prompt(q), [" " + v for v in q.options.values()]) for q in questions]
    pm.next_token_logprobs(ltexts[:4], letters)  # warm-up (kernels, allocator)
    pm.score_continuations(groups[:4])
    lp, t_letter = timed(device, lambda: pm.next_token_logprobs(ltexts, letters))
    opt, t_option = timed(device, lambda: pm.score_continuations(groups))
    n = len(questions)
    # useful FLOPs: letter = one sequence per question, LM head once; option = the packed sequence, LM head per option token
    l_lens = [len(pm.encode(t)) for t in ltexts]
    packed = [pm._pack(c, conts) for c, conts in groups]
    o_lens = [len(p["ids"]) for p in packed]
    o_heads = sum(len(tg[0]) for p in packed for tg in p["targets"])
    f_letter, f_option = flops(pm.model, l_lens, n), flops(pm.model, o_lens, o_heads)
    # the baseline on the first baseline_n questions (its cost per question is what is compared)
    b = min(baseline_n, n)
    pairs_l = [(ltexts[i], x) for i in range(b) for x in letters]
    pairs_o = [(c, x) for c, conts in groups[:b] for x in conts]
    bl, t_bl = timed(device, lambda: baseline_scores(pm, pairs_l, baseline_batch))
    bo, t_bo = timed(device, lambda: baseline_scores(pm, pairs_o, baseline_batch))
    bl, bo = np.array(bl).reshape(b, 4), np.array(bo).reshape(b, 4)
    ours_o = np.array([[s.logprob for s in row] for row in opt[:b]])
    row = {
        "model": name,
        "params_M": round(pm.info.n_params / 1e6, 1),
        "dtype": str(pm.dtype).removeprefix("torch."),
        "questions": n,
        "mean_letter_tokens": round(sum(l_lens) / n, 1),
        "mean_packed_option_tokens": round(sum(o_lens) / n, 1),
        "letter_q_per_s": n / t_letter,
        "option_q_per_s": n / t_option,
        "baseline_questions": b,
        "baseline_letter_q_per_s": b / t_bl,
        "baseline_option_q_per_s": b / t_bo,
        "letter_speedup": (n / t_letter) / (b / t_bl),
        "option_speedup": (n / t_option) / (b / t_bo),
        "letter_mfu": f_letter / t_letter / (peak * 1e12),
        "option_mfu": f_option / t_option / (peak * 1e12),
        "letter_tflops": f_letter / t_letter / 1e12,
        "option_tflops": f_option / t_option / 1e12,
        "agree_letter": float((lp[:b].argmax(1) == bl.argmax(1)).mean()),
        "agree_option": float((ours_o.argmax(1) == bo.argmax(1)).mean()),
        "max_abs_diff_option_logprob": float(np.abs(ours_o - bo).max()),
        "oom_retries": pm.oom_retries,
    }
    return row


def bench_lora(pm, questions, device, epochs: int, batch_size: int, max_length: int) -> dict:
    from clinqa.adapt.lora import LoraTrainConfig, finetune
    from clinqa.evaluate.prompts import cloze_prompt

    cfg = LoraTrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        quantization="none",
        patience=None,
        val_fraction=0.1,
    )
    tokens = (
        sum(min(max_length, len(pm.encode(cloze_prompt(q) + " " + q.options[q.answer]))) for q in questions)
        * (1 - cfg.val_fraction)
        * epochs
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="clinqa-gpu-lora-") as tmp:
        _, seconds = timed(device, lambda: finetune(pm, questions, cfg, Path(tmp) / "adapter"))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_mb() / 1024
    return {
        "model": pm.info.name,
        "questions": len(questions),
        "epochs": epochs,
        "batch_size": batch_size,
        "train_tokens": int(tokens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_GiB": peak,
        "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models", default="smollm2-135m,llama-1b,llama-8b")
    ap.add_argument("--n", type=int, default=1000, help="synthetic questions")
    ap.add_argument("--words", type=int, default=150, help="words per vignette (~200 tokens)")
    ap.add_argument(
        "--baseline-n", type=int, default=250, help="questions the baseline scores (its per-question rate is compared)"
    )
    ap.add_argument("--baseline-batch", type=int, default=32)
    ap.add_argument("--lora-model", default="llama-1b", help="'' to skip LoRA training")
    ap.add_argument("--lora-n", type=int, default=512)
    ap.add_argument("--lora-epochs", type=int, default=1)
    ap.add_argument("--lora-batch", type=int, default=8)
    ap.add_argument(
        "--tiny", action="store_true", help="smoke mode: tiny configs of the same architectures, few prompts"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from transformers.utils import logging as tlog

    from clinqa.models.embedded import embedded_model_dir
    from clinqa.models.runtime import RuntimeConfig, resolve_runtime

    tlog.set_verbosity_error()
    rt = resolve_runtime(RuntimeConfig(device=args.device, dtype=args.dtype))
    device, dtype = rt.device, rt.dtype
    if args.tiny:
        args.n, args.words = min(args.n, 24), min(args.words, 40)
        args.baseline_n, args.lora_n = min(args.baseline_n, 24), min(args.lora_n, 24)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    peak = matmul_peak_tflops(device, dtype, 512 if args.tiny or device.type == "cpu" else 8192)
    print(
        f"{gpu}; torch {torch.__version__}; {dtype}; measured {str(dtype).removeprefix('torch.')} matmul peak {peak:.3g} TFLOP/s"
    )
    questions = synthetic_questions(args.n, args.words)
    results = {
        "device": gpu,
        "dtype": str(dtype),
        "matmul_peak_tflops": peak,
        "tiny": args.tiny,
        "scoring": [],
        "lora": None,
    }

    def save() -> None:  # after every model, so a later failure keeps what was measured
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))

    for name in [m for m in args.models.split(",") if m]:
        pm = build_model(name, tokenizer, device, dtype, args.tiny)
        row = bench_scoring(name, pm, questions, peak, device, args.baseline_n, args.baseline_batch)
        results["scoring"].append(row)
        save()
        print(
            f"{name:>13} ({row['params_M']:.0f}M): letter {row['letter_q_per_s']:.1f} q/s ({row['letter_speedup']:.2f}x baseline, "
            f"MFU {100 * row['letter_mfu']:.1f}%), option {row['option_q_per_s']:.1f} q/s ({row['option_speedup']:.2f}x baseline, "
            f"MFU {100 * row['option_mfu']:.1f}%); agreement with baseline letter {row['agree_letter']:.3f} option {row['agree_option']:.3f}; "
            f"{row['mean_letter_tokens']:.0f} tokens/prompt",
            flush=True,
        )
        del pm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.lora_model:
        pm = build_model(args.lora_model, tokenizer, device, dtype, args.tiny)
        lq = synthetic_questions(args.lora_n, args.words, seed=1)
        try:
            results["lora"] = lora = bench_lora(pm, lq, device, args.lora_epochs, args.lora_batch, 512)
        except Exception as exc:  # the scoring figures above stay saved
            results["lora"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            raise
        print(
            f"LoRA {args.lora_model}: {lora['tokens_per_s']:.0f} tokens/s ({lora['train_tokens']} tokens in {lora['seconds']:.1f} s), "
            f"peak memory {lora['peak_memory_GiB']:.2f} GiB ({lora['peak_kind']})",
            flush=True,
        )
    save()


if __name__ == "__main__":
    main()
