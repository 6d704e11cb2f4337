"""Continuation scoring for `LocalModel` (lm-evaluation-harness's loglikelihood, computed faster).

One context and all its continuations are packed into a single sequence with a block attention mask
(each continuation sees the context and itself), so the shared question prefix is computed once;
log-softmax is taken only at the positions that predict continuation tokens. Tokenisation follows
lm-eval's `_encode_pair` exactly. Attention implementations that cannot take a block mask (flash
attention) score each continuation as its own right-padded sequence instead (`_score_unpacked`).

`ContinuationScoring` is a mixin of `clinqa.models.local.LocalModel`: it uses the model's `tokenizer`,
`model`, `pad_id`, `max_length`, `encode`/`encode_pair`, `_decoder`, `_lm_head`, `_to`, `_at`,
`_right_padded` and `_batched`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore
from clinqa.models.steer_start import steer_start
from clinqa.models.truncation import note_truncated


class ContinuationScoring:
    """`_score_continuations` and its parts, for LocalModel (see the module docstring)."""

    def _packed_attention(self) -> bool:
        """Whether the attention implementation takes a 4-D block mask (eager and SDPA do; flash attention does not)."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        return impl in ("eager", "sdpa")

    @torch.inference_mode()
    def _score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        packed = [self._pack(ctx, conts) for ctx, conts in groups]
        for i, (p, (ctx, _)) in enumerate(zip(packed, groups)):
            if p["truncated"]:
                note_truncated(i, ctx)
        if not self._packed_attention():
            return self._score_unpacked(packed)
        results: list[list[ContinuationScore]] = [[] for _ in groups]

        def step(batch: list[int]) -> None:
            width = len(packed[batch[0]]["ids"])
            n = len(batch)
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            pos = torch.zeros((n, width), dtype=torch.long)
            mask = torch.zeros((n, 1, width, width), dtype=torch.bool)
            for row, i in enumerate(batch):
                p = packed[i]
                L = len(p["ids"])
                ids[row, :L] = torch.tensor(p["ids"])
                pos[row, :L] = torch.tensor(p["pos"])
                mask[row, 0, :L, :L] = p["mask"]
                mask[row, 0, torch.arange(L, width), torch.arange(L, width)] = True  # pads see themselves only
            start = torch.tensor([packed[i]["targets"][0][0][0] for i in batch])  # the last context token
            with steer_start(start):
                hidden = self._decoder(
                    input_ids=self._to(ids), attention_mask=self._to(mask), position_ids=self._to(pos), use_cache=False
                ).last_hidden_state
            rows, cols, targets, owners = [], [], [], []
            for row, i in enumerate(batch):
                for j, (predictors, tgt) in enumerate(packed[i]["targets"]):
                    rows += [row] * len(predictors)
                    cols += predictors
                    targets += tgt
                    owners += [(i, j)] * len(predictors)
            acc = self._gather_scores(hidden, rows, cols, targets, owners)
            for i in batch:
                p = packed[i]
                results[i] = [
                    ContinuationScore(acc[(i, j)][0], len(p["targets"][j][1]), len(p["conts"][j]), acc[(i, j)][1])
                    for j in range(len(p["conts"]))
                ]

        self._batched([len(p["ids"]) for p in packed], step, logit_share=0.5)
        return results

    def _gather_scores(self, hidden, rows, cols, targets, owners) -> dict[tuple[int, int], list]:
        """Sum of target-token log-probabilities (and whether each was the argmax) per owner."""
        logits = self._lm_head(self._at(hidden, rows, cols)).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tgt = torch.as_tensor(targets, device=logits.device)
        token_lp = logprobs[torch.arange(len(tgt), device=logits.device), tgt].cpu().tolist()
        greedy = (logits.argmax(-1) == tgt).cpu().tolist()
        acc: dict[tuple[int, int], list] = {}
        for k, owner in enumerate(owners):
            a = acc.setdefault(owner, [0.0, True])
            a[0] += token_lp[k]
            a[1] = a[1] and greedy[k]
        return acc

    def _score_unpacked(self, packed: list[dict]) -> list[list[ContinuationScore]]:
        """The packed path's scores with one right-padded causal sequence per continuation (context +
        continuation but its last token): for attention that cannot take a block mask."""
        items = []  # (group, continuation, token ids, predicting positions, targets)
        for i, p in enumerate(packed):
            c = p["n_ctx"]
            for j, (_, tgt) in enumerate(p["targets"]):
                items.append((i, j, p["ids"][:c] + list(tgt[:-1]), list(range(c - 1, c - 1 + len(tgt))), list(tgt)))
        acc: dict[tuple[int, int], list] = {}

        def step(batch: list[int]) -> None:
            ids, _ = self._right_padded([items[k][2] for k in batch])
            start = torch.tensor([items[k][3][0] for k in batch])  # the last context token
            with steer_start(start):
                hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state
            rows, cols, targets, owners = [], [], [], []
            for row, k in enumerate(batch):
                i, j, _, predictors, tgt = items[k]
                rows += [row] * len(predictors)
                cols += predictors
                targets += tgt
                owners += [(i, j)] * len(predictors)
            acc.update(self._gather_scores(hidden, rows, cols, targets, owners))

        self._batched([len(it[2]) for it in items], step, logit_share=0.5)
        return [
            [
                ContinuationScore(acc[(i, j)][0], len(p["targets"][j][1]), len(p["conts"][j]), acc[(i, j)][1])
                for j in range(len(p["conts"]))
            ]
            for i, p in enumerate(packed)
        ]

    def _pack(self, context: str, continuations: Sequence[str]) -> dict:
        """One sequence: context tokens, then each continuation's tokens but its last.

        Returns token ids, position ids, a [L, L] boolean attention mask (True = may attend) and,
        per continuation, the positions whose output predicts each of its tokens.
        """
        if not continuations:
            raise ValueError("score_continuations needs at least one continuation per context")
        pairs = [self.encode_pair(context, c) if context else ([], self.encode(c)) for c in continuations]
        ctx = pairs[0][0]
        if not ctx:  # lm-eval conditions an empty context on the BOS/EOS token
            prefix = (
                self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            )
            ctx = [prefix]
        conts = [cont for _, cont in pairs]
        for c, cont in zip(continuations, conts):
            if not cont:
                raise ClinqaError(f"continuation {c!r} encodes to no tokens")
        budget = self.max_length - max(len(c) for c in conts)
        if budget < 1:
            raise ClinqaError("a continuation is longer than the model's context window")
        truncated = len(ctx) > budget
        ctx = ctx[-budget:]  # left-truncate like lm-eval
        c = len(ctx)
        ids, pos = list(ctx), list(range(c))
        segments = []
        for cont in conts:
            start = len(ids)
            ids += cont[:-1]
            pos += range(c, c + len(cont) - 1)
            segments.append((start, len(ids)))
        L = len(ids)
        mask = torch.zeros((L, L), dtype=torch.bool)
        mask[:c, :c] = torch.tril(torch.ones((c, c), dtype=torch.bool))
        targets = []
        for (start, end), cont in zip(segments, conts):
            if end > start:
                mask[start:end, :c] = True
                mask[start:end, start:end] = torch.tril(torch.ones((end - start, end - start), dtype=torch.bool))
            targets.append(([c - 1, *range(start, end)], list(cont)))
        return {
            "ids": ids,
            "pos": pos,
            "mask": mask,
            "targets": targets,
            "conts": list(continuations),
            "n_ctx": c,
            "truncated": truncated,
        }
