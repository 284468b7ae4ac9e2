"""KVzip: query-agnostic scores from the attention the model pays while repeating the context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..base import register
from .base import RECENCY, RECONSTRUCTION, KVContext, KVMethod, ragged_index, ranks

#: the instruction of KVzip's reconstruction prompt
REPEAT = "Repeat the previous context exactly."


def kvzip_prompt(tokenizer: Any, instruction: str = REPEAT) -> tuple[int, ...]:
    """Token ids of KVzip's reconstruction prompt for ``tokenizer``'s model.

    The prompt closes the user turn the context was written in: ``"\\n\\n" + instruction``,
    then, when the tokenizer has a chat template, what that template puts between a user
    message and the assistant's answer (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``). The
    assistant's "answer" is then the context itself, fed by the method.
    """
    text = "\n\n" + instruction
    if getattr(tokenizer, "chat_template", None):
        sep = "\x1fTOKENMERGE\x1f"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": sep}], add_generation_prompt=True, tokenize=False
        )
        text += rendered.split(sep, 1)[1]
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


@register
@dataclass
class KVzip(KVMethod):
    """KVzip (Kim et al., NeurIPS 2025): score each entry by how much the model needs it to
    reconstruct the context.

    "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    arXiv:2505.23416.

    After the prefill of a context ``c`` (``n`` tokens), the model is fed the reconstruction
    input ``x = prompt ⊕ c`` on the cached context. Split into chunks ``c_1 … c_m`` of
    ``chunk`` tokens, chunk ``t`` is fed as ``prompt ⊕ c_t`` on a fork of the full cache, so
    each forward costs ``O(chunk · n)`` attention and the extra memory stays bounded. With
    ``A^{(t)} = softmax(q Kᵀ/√d)`` the attention of those queries over every cached entry and
    their own causal prefix, the score of context entry ``j`` of KV head ``h`` is the most
    attention it receives from any reconstruction query of any query head ``g`` of its group::

        S_{h,j} = max_t max_{g ∈ G(h)} max_{i ∈ x_t} A^{(t)}_{g,i,j}

    The paper keeps the top-scored pairs over *all* layers and heads at once
    (``allocation="global"``): with ``B = Σ_l H · k_l`` the budget of the whole cache, the
    kept set is the top-``B`` of ``{S^{(l)}_{h,j}}``, so layers and heads whose
    reconstruction attention is concentrated give budget to those where it is spread; heads
    then hold different numbers of entries (masked per head, as for ``adakv``).
    ``allocation="uniform"`` keeps ``k_l`` per head instead (the ``pair-uniform`` level of
    the paper's code). The first ``sink`` entries of each sequence are kept whatever their
    score, as the paper keeps the system prompt (kvpress keeps 4): some heads of some models
    (Qwen2.5) pay the attention sink little attention during the reconstruction, yet
    evicting it ruins them. Under the global allocation every head also keeps its best
    entry, so that none is left empty. The scores do not depend on any question, so one
    compressed cache serves every later query.

    The paper's softmax runs over the system prompt, the chunk's own part of the context
    and the reconstruction tokens only; here it runs over the whole cache (the same for a
    context of up to ``chunk`` tokens).

    Cost: ``ceil(n / chunk)`` extra forwards over ``n + m·|prompt|`` tokens in all, each
    attending to the whole context: about one more prefill, plus the explicit attention
    rows at every layer (measured in ``docs/results/``).

    Attributes:
        prompt: token ids of the reconstruction prompt; build them with
            :func:`kvzip_prompt` (the paper's "Repeat the previous context" in the model's
            chat template). Empty: the context is fed again right after itself.
        chunk: context tokens per reconstruction forward (the paper uses 2K).
        sink: entries at the start of each sequence kept whatever their score.
        allocation: ``"global"`` (one ranking over every layer and head, the paper's
            default) or ``"uniform"`` (each head keeps its layer's ``ratio``).
    """

    name: ClassVar[str] = "kvzip"
    needs: ClassVar[frozenset[str]] = frozenset({"keys", "queries"})
    reconstructs: ClassVar[bool] = True
    prompt: tuple[int, ...] = ()
    chunk: int = 2048
    sink: int = 4
    allocation: Literal["global", "uniform"] = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0 (entries kept at the start), got {self.sink}")
        if self.allocation not in ("global", "uniform"):
            raise ValueError(f"allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if any(t < 0 for t in self.prompt):
            raise ValueError(f"prompt must hold token ids (>= 0), got {self.prompt}")

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """The ``[start, stop)`` spans of the context fed per reconstruction forward; aligned
        to its end (the first may be short), so that a left-padded sample is split at the
        same tokens as when it runs alone."""
        first = n - (n - 1) // self.chunk * self.chunk if n else 0
        return [(max(e - self.chunk, 0), e) for e in range(first, n + 1, self.chunk)] if n else []

    def extra_forwards(self, n: int) -> int:
        return math.ceil(n / self.chunk)

    def reconstruction_score(self, ctx: KVContext, block: int = 256) -> Tensor:
        """``[B, H_kv, L]``: the most attention each stored entry receives from the real
        queries of this (reconstruction) forward, over query heads and queries
        (:meth:`KVContext.attention_blocks`, ``block`` queries at a time)."""
        b, hk, l, _ = ctx.keys.shape
        best = ctx.keys.new_zeros(b, hk, l, dtype=torch.float32)
        for real, a in ctx.attention_blocks(block):
            a = a * real[:, None, None, :, None]  # padding queries weigh 0
            seen = best[..., : a.shape[-1]]
            torch.maximum(seen, a.amax(dim=(2, 3)), out=seen)
        return best

    @property
    def shares_layers(self) -> bool:
        return self.allocation == "global"

    @property
    def ragged(self) -> bool:  # type: ignore[override]
        return self.shares_layers  # the global ranking leaves heads with different numbers

    def select_layers(
        self,
        ctxs: dict[int, KVContext],
        keeps: dict[int, Tensor],
        forced: dict[int, Tensor | None] | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """The global allocation: the top ``Σ_l H · keeps[l]`` scores over every layer and
        head of each sample (ties go to the earlier layer, head, entry). With ``per_head=False``
        the (layer, entry) pairs are ranked by their head-averaged score instead, and the
        heads of a layer keep the same entries (``Σ_l k_l`` of them)."""
        if not self.shares_layers:
            return super().select_layers(ctxs, keeps, forced)
        forced = forced or {}
        # a layer the reconstruction could not score (sliding window) ranks by itself
        unseen = {i: c for i, c in ctxs.items() if RECONSTRUCTION not in c.stats}
        out = super().select_layers(unseen, keeps, forced)
        ctxs = {i: c for i, c in ctxs.items() if i not in unseen}
        flat, shapes, total = [], [], 0
        for i, ctx in ctxs.items():
            valid = ctx.valid[:, None, :]
            s = self.score(ctx).float().nan_to_num(nan=-3e38, posinf=3e38, neginf=-3e38)
            if not self.per_head:  # the heads of a layer keep the same entries
                s = s.mean(1, keepdim=True)
            s = s.masked_fill(~valid, -math.inf)
            must = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.argmax(-1, True), True)
            for f in (self.must_keep(ctx, keeps[i]), forced.get(i)):
                if f is not None:
                    must |= f.any(1, keepdim=True) if not self.per_head else f
            flat.append(torch.where(must & valid, math.inf, s).flatten(1))
            shapes.append(s.shape)
            total = total + torch.minimum(keeps[i].to(s.device), ctx.counts) * s.shape[1]
        chosen = (ranks(torch.cat(flat, 1)) < total[:, None]).split(
            [math.prod(x[1:]) for x in shapes], 1
        )
        for (i, ctx), c, shape in zip(ctxs.items(), chosen, shapes, strict=True):
            heads = ctx.keys.shape[1]
            out[i] = ragged_index(c.view(shape).expand(-1, heads, -1) & ctx.valid[:, None, :])
        return out

    def must_keep(self, ctx: KVContext, keep: Tensor) -> Tensor | None:
        if not self.sink:
            return None
        return (ctx.position < self.sink) & ctx.valid[:, None, :]

    def score(self, ctx: KVContext) -> Tensor:
        s = ctx.stats.get(RECONSTRUCTION, ctx.stats.get(RECENCY))
        if s is None:
            raise RuntimeError(
                "kvzip scores come from forwards after the prefill: run the prefill on a model "
                "patched with tm.apply(model, kvzip), or compress a recorded prefill with "
                "hf_decoder.compress(..., model=model, input_ids=ids)"
            )
        return s
