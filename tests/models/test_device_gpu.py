"""On a CUDA GPU (skipped elsewhere; benchmarks/gpu_check.sh runs these): the embedded model gives the
same predictions in float32 on the GPU as on the CPU, and bf16's agreement with fp32 is measured and
reported (printed with -s), not assumed."""

import numpy as np
import pytest
import torch

from clinqa.models.runtime import Runtime

pytestmark = pytest.mark.gpu


def _models():
    from clinqa.models import load_base_model

    cpu = load_base_model("default", Runtime(torch.device("cpu"), torch.float32))
    cuda32 = load_base_model("default", Runtime(torch.device("cuda", 0), torch.float32))
    cuda16 = load_base_model("default", Runtime(torch.device("cuda", 0), torch.bfloat16))
    return cpu, cuda32, cuda16


def _prompts(n=60):
    stems = [
        "chest pain radiating to the jaw",
        "fever and neck stiffness",
        "painless jaundice and weight loss",
        "sudden severe headache",
        "polyuria and polydipsia",
        "wheeze and eosinophilia",
    ]
    options = [" Myocardial infarction", " Meningitis", " Pancreatic cancer", " Subarachnoid haemorrhage"]
    groups, letters = [], []
    for i in range(n):
        ctx = f"Question {i}: A patient presents with {stems[i % len(stems)]}. What is the most likely diagnosis?\nAnswer:"
        groups.append((ctx, options))
        letters.append(ctx.replace("\nAnswer:", "\nA. MI\nB. Meningitis\nC. Cancer\nD. SAH\nAnswer:"))
    return groups, letters


def test_fp32_on_cuda_gives_the_cpu_predictions_and_bf16_agreement_is_reported():
    cpu, cuda32, cuda16 = _models()
    assert cuda32.device.type == "cuda" and cuda16.dtype == torch.bfloat16
    groups, letters = _prompts()
    cands = [" A", " B", " C", " D"]
    lp_cpu = cpu.next_token_logprobs(letters, cands)
    lp_gpu = cuda32.next_token_logprobs(letters, cands)
    lp_bf = cuda16.next_token_logprobs(letters, cands)
    np.testing.assert_allclose(lp_gpu, lp_cpu, atol=2e-3)  # TF32 stays off by default for matmuls
    assert (lp_gpu.argmax(1) == lp_cpu.argmax(1)).all()
    opt = [np.array([[s.logprob for s in row] for row in m.score_continuations(groups)]) for m in (cpu, cuda32, cuda16)]
    np.testing.assert_allclose(opt[1], opt[0], atol=5e-3)  # the packed block-mask path through SDPA on the GPU
    assert (opt[1].argmax(1) == opt[0].argmax(1)).all()
    letter_agree = float((lp_bf.argmax(1) == lp_cpu.argmax(1)).mean())
    option_agree = float((opt[2].argmax(1) == opt[0].argmax(1)).mean())
    print(
        f"\nbf16 vs fp32 agreement on {len(letters)} prompts: letter {letter_agree:.3f}, option {option_agree:.3f}; "
        f"max |dlogprob| letter {np.abs(lp_bf - lp_cpu).max():.3f}, option {np.abs(opt[2] - opt[0]).max():.3f}"
    )
    assert np.isfinite(lp_bf).all() and np.isfinite(opt[2]).all()


def test_memory_scaled_budget_and_generation_on_cuda():
    from clinqa.models.base import GenerationConfig
    from clinqa.models.batching import device_budget

    cpu, cuda32, _ = _models()
    tokens, size = device_budget(cuda32.device, cuda32.model.config, cuda32.dtype, 300, (1024, 64), 0.5)
    assert tokens > 1024 and size > 64
    cfg = GenerationConfig(max_new_tokens=8)
    assert cuda32.generate(["What reverses opioid overdose?"], cfg) == cpu.generate(
        ["What reverses opioid overdose?"], cfg
    )
    hs_gpu = cuda32.hidden_states(["Question: chest pain?"], [0, 15])[0]
    hs_cpu = cpu.hidden_states(["Question: chest pain?"], [0, 15])[0]
    np.testing.assert_allclose(hs_gpu, hs_cpu, atol=1e-2, rtol=1e-3)
