"""Local transformers backend: the fast path for scoring, on the CPU or a GPU.

Two decisions make it fast and still equal to lm-evaluation-harness:
- Next-token scoring runs the decoder once per prompt (right-padded batches sorted by length, where
  causal attention makes padding harmless) and applies the LM head only at each prompt's last token.
- Continuation scoring packs one context and all its continuations into a single sequence with a
  block attention mask (each continuation sees the context and itself), so the shared question
  prefix is computed once; log-softmax is taken only at the positions that predict continuation
  tokens. Tokenisation follows lm-eval's `_encode_pair` exactly. Attention implementations that
  cannot take a block mask (flash attention) score each continuation as its own sequence instead.
  That part is `clinqa.models.continuations` (a mixin of LocalModel).

Every tensor goes to the model's device (`clinqa.models.runtime`); batches are sized to the device's
free memory and an out-of-memory error halves the batch (`clinqa.models.batching`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo
from clinqa.models.batching import device_budget, run_batches
from clinqa.models.continuations import ContinuationScoring
from clinqa.models.runtime import Runtime, current_runtime, model_device
from clinqa.models.steer_start import STEER_START, steer_start  # noqa: F401  (STEER_START: adapt.control imports it from here)
from clinqa.models.truncation import note_truncated

# On the CPU a batch holds at most this many (padded) tokens; keeps attention and activations cache-friendly.
MAX_BATCH_TOKENS = int(os.environ.get("CLINQA_MAX_BATCH_TOKENS", "1024"))
MAX_BATCH_SIZE = 64


def length_batches(
    lengths: Sequence[int], max_tokens: int = MAX_BATCH_TOKENS, max_size: int = MAX_BATCH_SIZE
) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) under a padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * width > max_tokens or len(cur) >= max_size:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft reads `model.is_gradient_checkpointing`, which newer transformers deprecates with a
    FutureWarning on every adapter load; it is peft's to change, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _cache_keyword(decoder) -> str:
    """What a decoder's forward calls its KV cache (and its output's field): `cache` in newer
    transformers, which warns on `past_key_values` and will drop it; `past_key_values` before. Read
    from the class, so a forward wrapped on the instance (hooks, a test's spy) does not hide it."""
    return _class_cache_keyword(type(decoder))


@functools.cache
def _class_cache_keyword(cls: type) -> str:  # once per decoder class, not on every scoring call
    try:
        return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    except (TypeError, ValueError):  # a forward without a signature to read: the long-standing name
        return "past_key_values"


class LocalModel(ContinuationScoring):
    """A causal LM from transformers implementing the Predictor protocol.

    LoRA adapters are loaded into the one model object and switched per call: `with_adapter(name)`
    returns a view that shares weights, so several adapters cost no second copy of the base model.
    A view's `info.spec` names its adapter as a `+lora:` spec would (`BASE+lora:FOLDER`), so whatever
    records the spec (a run folder's identity, a selector's settings) tells two adapters apart.
    """

    def __init__(self, model, tokenizer, info: ModelInfo, adapter: str | None = None, _shared: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info
        self.adapter = adapter
        # state shared by all adapter views of this model: the PeftModel (once an adapter is loaded), the
        # adapters loaded (resolved folder -> name) and the base model's spec
        self._shared = (
            _shared
            if _shared is not None
            else {"peft": None, "lock": threading.RLock(), "adapters": {}, "spec": info.spec}
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.max_length = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 8192)
        self.device = model_device(model)
        self.oom_retries = 0  # batches halved after an out-of-memory error (a count, for benchmarks and tests)

    # -- adapters -------------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, name: str | None = None) -> LocalModel:
        """Load a PEFT adapter folder into the shared model (once) and return a view that uses it."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ClinqaError(
                f"{path} is not a LoRA adapter folder (no adapter_config.json): train one with `clinqa finetune`"
            )
        name = name or f"a{len(self._shared['adapters'])}_" + "".join(
            c if c.isalnum() else "_" for c in path.name
        )  # torch module names: no dots
        with self._shared["lock"]:
            known = self._shared["adapters"]
            if str(path.resolve()) in known:
                name = known[str(path.resolve())]
            else:
                if self._shared["peft"] is None:
                    with quiet_peft_deprecations():
                        self._shared["peft"] = PeftModel.from_pretrained(
                            self.model, str(path), adapter_name=name, is_trainable=False
                        )
                else:
                    self._shared["peft"].load_adapter(str(path), adapter_name=name, is_trainable=False)
                known[str(path.resolve())] = name
        return self.with_adapter(name, folder=path)

    @property
    def adapter_path(self) -> Path | None:
        """The folder of this view's adapter, resolved (None for the base model): what its weights are
        read from (`cost`, the weights hash of `records.train`)."""
        return None if self.adapter is None else self._folder_of(self.adapter)

    def cost(self) -> dict:
        """What this view adds to the base model: the adapter's parameters and training time."""
        path = self.adapter_path
        meta_file = path / "clinqa_adapter.json" if path else None
        if meta_file is None or not meta_file.is_file():
            return {}
        import json

        meta = json.loads(meta_file.read_text())
        return {
            "extra_params": int(meta.get("trainable_params") or 0),
            "training_s": float(meta.get("train_seconds") or 0.0),
        }

    def with_adapter(self, name: str | None, *, folder: str | Path | None = None) -> LocalModel:
        """A view of the shared model that uses the loaded adapter `name` (None: the base model). Its
        spec is the base model's plus `+lora:FOLDER` (`folder` as the caller named it, else the folder
        the adapter was loaded from), the spec that loading it with `+lora:` gives."""
        base = self._shared["spec"]
        if name is not None:
            folder = folder if folder is not None else self._folder_of(name)
            base = f"{base}+lora:{folder}" if folder is not None else f"{base}+lora@{name}"
        info = ModelInfo(**{**self.info.__dict__, "spec": base, "extra": {**self.info.extra, "adapter": name}})
        return LocalModel(self.model, self.tokenizer, info, adapter=name, _shared=self._shared)

    def _folder_of(self, name: str) -> Path | None:
        return next((Path(p) for p, n in self._shared["adapters"].items() if n == name), None)

    @contextmanager
    def _adapter_scope(self) -> Iterator[None]:
        peft = self._shared["peft"]
        if peft is None:
            yield
            return
        with self._shared["lock"]:
            if self.adapter is None:
                with peft.disable_adapter():
                    yield
            else:
                peft.set_adapter(self.adapter)
                yield

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, spec: str, name: str | None = None, runtime: Runtime | None = None
    ) -> LocalModel:
        """Load a model folder (or cached HF id) on `runtime` (default: `current_runtime()`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rt = runtime or current_runtime()
        path = str(path)
        local = Path(path).exists()
        kwargs: dict = {"dtype": rt.dtype}
        if rt.device_map:
            kwargs["device_map"] = rt.device_map
        elif rt.device.type != "cpu":
            kwargs["device_map"] = {"": str(rt.device)}  # weights load straight onto the device, no CPU copy
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        except OSError as exc:
            if local:
                raise ClinqaError(
                    f"{path} is not a loadable model folder (need config.json and weights): {exc}"
                ) from exc
            raise ClinqaError(
                f"model {path!r} is neither a local folder nor in the Hugging Face cache (these machines are offline): "
                "pass a folder, a .gguf file, 'default', or openai:URL#MODEL"
            ) from exc
        return cls.from_objects(model, tokenizer, spec=spec, name=name or Path(path).name)

    @classmethod
    def from_objects(cls, model, tokenizer, *, spec: str = "in-memory", name: str = "in-memory") -> LocalModel:
        cfg = model.config
        first = next(model.parameters())
        info = ModelInfo(
            spec=spec,
            backend="transformers",
            name=name,
            n_layers=getattr(cfg, "num_hidden_layers", None),
            hidden_size=getattr(cfg, "hidden_size", None),
            n_params=sum(p.numel() for p in model.parameters()),
            context_length=getattr(cfg, "max_position_embeddings", None),
            extra={
                "device": model_device(model).type,
                "dtype": str(first.dtype).removeprefix("torch."),
                **({"device_map": "auto"} if len(getattr(model, "hf_device_map", None) or {}) > 1 else {}),
            },
        )
        return cls(model, tokenizer, info)

    # -- tokenisation -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: trailing context spaces move to the continuation; the
        continuation's tokens are those of (context + continuation) beyond the context's."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def candidate_token_ids(self, context: str, candidates: Sequence[str]) -> list[int]:
        ids = []
        for cand in candidates:
            _, cont = self.encode_pair(context, cand)
            if len(cont) != 1:
                raise ClinqaError(
                    f"candidate {cand!r} is {len(cont)} tokens for this tokenizer; next-token scoring needs one"
                )
            ids.append(cont[0])
        return ids

    @property
    def _decoder(self):
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    @property
    def _lm_head(self):
        return self.model.get_output_embeddings()

    # -- scoring --------------------------------------------------------------------------------
    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        with self._adapter_scope():
            return self._next_token_logprobs(contexts, candidates)

    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        with self._adapter_scope():
            return self._score_continuations(groups)

    def next_token_logprobs_shared(self, prefix: str, suffixes: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """`next_token_logprobs([prefix + s for s in suffixes], candidates)` with the prefix computed once
        per packed sequence: the record stage-1 selector asks one question about hundreds of lines."""
        with self._adapter_scope():
            return self._next_token_logprobs_shared(prefix, suffixes, candidates)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        with self._adapter_scope():
            return self._generate(prompts, config)

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        with self._adapter_scope():
            return self._hidden_states(texts, layers)

    def token_logprobs(self, texts: Sequence[str]) -> list[dict]:
        """Per text: token ids, character offsets and the log-probability of every token given its
        prefix (the first token has none: NaN). One forward per text; used to read term probabilities."""
        with self._adapter_scope():
            return self._token_logprobs(texts)

    @property
    def layers(self):
        """The decoder blocks, in order (block i produces hidden-state layer i + 1)."""
        return self._decoder.layers

    def _right_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n, longest] padded on the right, index of each row's last real token), on the model's device."""
        ids = torch.full((len(seqs), max(map(len, seqs))), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
        return self._to(ids), self._to(torch.tensor([len(seq) - 1 for seq in seqs], dtype=torch.long))

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True) if t.device != self.device else t

    def _batched(
        self,
        lengths: Sequence[int],
        step,
        *,
        max_size: int | None = None,
        logit_share: float = 0.0,
        cache: bool = False,
    ) -> None:
        """Run `step(batch)` over length-sorted batches sized for the device, halving a batch that runs out of memory."""
        if not lengths:
            return
        tokens, size = device_budget(
            self.device,
            self.model.config,
            self.dtype,
            max(lengths),
            (MAX_BATCH_TOKENS, MAX_BATCH_SIZE),
            logit_share,
            cache,
        )
        batches = length_batches(lengths, tokens, min(size, max_size or size))
        self.oom_retries += run_batches(batches, lengths, step, self.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def _at(hidden: torch.Tensor, rows, cols) -> torch.Tensor:
        """hidden[rows, cols] with the index tensors on hidden's device (the last GPU under a device map)."""
        return hidden[torch.as_tensor(rows, device=hidden.device), torch.as_tensor(cols, device=hidden.device)]

    @torch.inference_mode()
    def _next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        if not contexts:
            return np.zeros((0, len(candidates)), dtype=np.float64)
        cand_ids = self.candidate_token_ids(contexts[0], candidates)
        encoded = [self.encode(c) for c in contexts]
        for i, e in enumerate(encoded):
            if len(e) > self.max_length:
                note_truncated(i, contexts[i])
        encoded = [e[-self.max_length :] for e in encoded]
        out = np.zeros((len(contexts), len(candidates)), dtype=np.float64)

        def step(batch: list[int]) -> None:
            ids, last = self._right_padded([encoded[i] for i in batch])
            # Right padding: causal attention never lets a real token see a pad, so no mask is needed.
            with steer_start(last.clone()):
                hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state
            logits = self._lm_head(self._at(hidden, range(len(batch)), last)).float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, cand_ids]
            out[batch] = logprobs.double().cpu().numpy()

        self._batched([len(e) for e in encoded], step)
        return out

    @torch.inference_mode()
    def _next_token_logprobs_shared(
        self, prefix: str, suffixes: Sequence[str], candidates: Sequence[str]
    ) -> np.ndarray:
        # The prefix runs once into a KV cache; the suffixes run in right-padded batches on copies of it
        # (positions continue from the prefix), so each costs only its own tokens. The token ids fed
        # are exactly the unshared path's: prefix + suffix must tokenise as the prefix's tokens then more.
        if not suffixes:
            return np.zeros((0, len(candidates)), dtype=np.float64)
        cand_ids = self.candidate_token_ids(prefix + suffixes[0], candidates)
        wholes = [self.encode(prefix + s) for s in suffixes]
        ctx = self.encode(prefix.rstrip())
        if (
            not ctx
            or any(w[: len(ctx)] != ctx or len(w) == len(ctx) for w in wholes)
            or max(map(len, wholes)) > self.max_length
        ):
            # the prefix does not tokenise on its own (a merge across the boundary), or a text is too long
            return self._next_token_logprobs([prefix + s for s in suffixes], candidates)
        c = len(ctx)
        tails = [w[c:] for w in wholes]
        with steer_start(torch.tensor([c])):  # the unshared path steers only the last token: never the prefix
            kw = _cache_keyword(self._decoder)
            cache = getattr(self._decoder(input_ids=self._to(torch.tensor([ctx])), use_cache=True), kw)
        out = np.zeros((len(suffixes), len(candidates)), dtype=np.float64)

        def step(batch: list[int]) -> None:
            ids, last = self._right_padded([tails[i] for i in batch])
            width = ids.shape[1]
            kv = copy.deepcopy(cache)
            kv.batch_repeat_interleave(len(batch))
            pos = self._to(torch.arange(c, c + width).expand(len(batch), width))
            with steer_start(last.clone()):  # right padding: causal attention never lets a real token see a pad
                hidden = self._decoder(
                    input_ids=ids,
                    **{kw: kv},
                    position_ids=pos,
                    use_cache=True,
                    attention_mask=self._to(torch.ones((len(batch), c + width), dtype=torch.long)),
                ).last_hidden_state
            logits = self._lm_head(self._at(hidden, range(len(batch)), last)).float()
            out[batch] = torch.log_softmax(logits, dim=-1)[:, cand_ids].double().cpu().numpy()

        # on a GPU each row's copy of the prefix cache counts in its length; the CPU keeps its measured batching
        prefix = 0 if self.device.type == "cpu" else c
        self._batched([prefix + len(t) for t in tails], step, cache=True)
        return out

    # -- generation ---------------------------------------------------------------------------
    def format_prompt(self, prompt: str, config: GenerationConfig) -> str:
        if not config.chat or not getattr(self.tokenizer, "chat_template", None):
            return prompt
        messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        config = config or GenerationConfig()
        texts = [self.format_prompt(p, config) for p in prompts]
        outputs: list[str] = [""] * len(texts)
        encoded = [self.encode(t) for t in texts]
        for i, e in enumerate(encoded):
            if len(e) + config.max_new_tokens > self.max_length:  # the prompt and answer overflow the window
                note_truncated(i, prompts[i])
        gen = torch.Generator().manual_seed(config.seed)

        def step(batch: list[int]) -> None:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding for generation
                e = encoded[i]
                ids[row, width - len(e) :] = torch.tensor(e)
                attn[row, width - len(e) :] = 1
            kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=self.pad_id)
            if config.temperature > 0:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with steer_start(torch.full((len(batch),), width - 1)):
                out = self.model.generate(input_ids=self._to(ids), attention_mask=self._to(attn), **kwargs).cpu()
            for row, i in enumerate(batch):
                text = self.tokenizer.decode(out[row, width:], skip_special_tokens=True)
                for s in config.stop:
                    if s and s in text:
                        text = text[: text.index(s)]
                outputs[i] = text.strip()

        self._batched([len(e) + config.max_new_tokens for e in encoded], step, max_size=16, cache=True)
        return outputs

    @torch.inference_mode()
    def _token_logprobs(self, texts: Sequence[str]) -> list[dict]:
        encs = [self.tokenizer(t, return_offsets_mapping=True) for t in texts]
        ids_list = [e["input_ids"][-self.max_length :] for e in encs]
        out: list[dict] = [{} for _ in texts]

        def step(batch: list[int]) -> None:
            ids, _ = self._right_padded([ids_list[i] for i in batch])
            hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state
            done = {}
            for row, i in enumerate(batch):
                n = len(ids_list[i])
                lp = torch.full((n,), float("nan"))
                if n > 1:
                    logits = self._lm_head(hidden[row, : n - 1]).float()
                    targets = torch.tensor(ids_list[i][1:], device=logits.device)
                    lp[1:] = torch.log_softmax(logits, -1)[torch.arange(n - 1, device=logits.device), targets].cpu()
                offsets = encs[i]["offset_mapping"][-n:]
                done[i] = {"ids": ids_list[i], "offsets": [tuple(o) for o in offsets], "logprobs": lp.numpy()}
            for i, d in done.items():  # stored only once the whole batch is through (an OOM retries it)
                out[i] = d

        self._batched([len(x) for x in ids_list], step, logit_share=0.25)
        return out

    # -- internals ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        n = self.info.n_layers or 0
        for layer in layers:
            if not 0 <= layer <= n:
                raise ClinqaError(f"layer {layer} is out of range: this model has layers 0..{n}")
        out = []
        for text in texts:
            ids = self._to(torch.tensor([self.encode(text)[-self.max_length :]]))
            hs = self._decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            out.append(torch.stack([hs[layer][0].float().cpu() for layer in layers]).numpy())
        return out
