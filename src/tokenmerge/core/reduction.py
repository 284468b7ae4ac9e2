"""The reduction object: one sparse matrix T that maps N input tokens to N' output tokens.

Every method in tokenmerge returns a :class:`Reduction` (Token Transforming's view, Zeng et al.
2025: ``Y = T X``). T is stored column-wise and sparse: input token ``i`` sends the fraction
``weight[b, i, j]`` of itself to output ``index[b, i, j]``, for ``j < k``. That covers

- pruning: a kept input sends weight 1 to its own slot, a dropped one sends nothing;
- merging (ToMe, PiToMe, DToMe, ...): every input sends weight 1 to exactly one output;
- propagation (GTP): kept tokens keep weight 1, dropped ones send ``alpha * A_hat`` to neighbours;
- many-to-many (Token Transforming): an input spreads soft weights over up to ``k`` outputs.

Each output also has a *representative* input (``rep``): the token it stands for. It gives the
output its original position (RoPE, spatial graphs, visualisation) and its protected flag.
Outputs are always ordered by representative, so prefix tokens (CLS, registers) stay in front
and causal order is preserved. Outputs that receive no mass are padding (size 0); they appear
only when samples in a batch keep different numbers of tokens.

All kernels are gather / scatter_add; there is no Python loop over tokens or over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["mean", "sum", "mlerp"]
_MODES = ("mean", "sum", "mlerp")


@dataclass(frozen=True)
class Reduction:
    """Sparse token map ``T: N_in -> N_out`` (see the module docstring).

    Attributes:
        index: ``[B, N_in, k]`` long, output slot that each input sends mass to.
        weight: ``[B, N_in, k]`` float, how much of the input goes there (0 = nothing).
        rep: ``[B, N_out]`` long, the input each output stands for.
        mode: how features combine. ``"mean"``: ``y_o = sum_i w_io s_i x_i / sum_i w_io s_i``
            (size-weighted average, ToMe's ``merge_wavg``); ``"sum"``: ``y_o = sum_i w_io x_i``
            (GTP's propagation ``X_K + alpha A X_P``); ``"mlerp"``: the mean, rescaled to the
            largest norm among its inputs (ToFu's norm-preserving merge).
        selection: True when T only selects rows (pruning); features are then gathered directly.
        uniform: True when it is known without looking at the data that every sample keeps
            exactly ``n_out`` tokens (a static budget): no padding slots appear.
    """

    index: Tensor
    weight: Tensor
    rep: Tensor
    mode: Mode = "mean"
    selection: bool = False
    uniform: bool = False  # known statically: every sample keeps all ``n_out`` outputs

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown reduction mode {self.mode!r}; expected one of {_MODES}")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def identity(batch: int, n: int, device: torch.device | None = None) -> Reduction:
        """The identity map on ``n`` tokens."""
        ar = torch.arange(n, device=device).expand(batch, n)
        return Reduction(
            index=ar.unsqueeze(-1),
            weight=torch.ones(batch, n, 1, device=device),
            rep=ar,
            selection=True,
            uniform=True,
        )

    @staticmethod
    def from_targets(
        target: Tensor,
        weight: Tensor | None = None,
        mode: Mode = "mean",
        kept: int | None = None,
        selection: bool | None = None,
    ) -> Reduction:
        """Build T from where each input goes, naming destinations by their *input* index.

        Args:
            target: ``[B, N_in]`` or ``[B, N_in, k]`` long. ``target[b, i] == i`` makes token
                ``i`` a representative (an output); any other value ``t`` sends token ``i``
                into the output represented by ``t`` (which must satisfy ``target[b, t] == t``).
                ``-1`` drops the token (sends nothing). With ``k > 1`` columns, the first
                column decides whether ``i`` is a representative.
            weight: same shape as ``target``; defaults to 1 (dropped entries get 0).
            mode: see :class:`Reduction`.
            kept: the caller guarantees that every sample keeps exactly this many tokens (a
                static budget on unpadded tokens): the output count is then not read from the
                data, which keeps ``torch.compile`` graphs whole, and the result is ``uniform``.
            selection: whether T only keeps or drops tokens (``None``: read from the data).
        """
        if target.dim() == 2:
            target = target.unsqueeze(-1)
            weight = None if weight is None else weight.unsqueeze(-1)
        b, n, _ = target.shape
        ar = torch.arange(n, device=target.device)
        is_rep = target[..., 0] == ar
        slot = is_rep.long().cumsum(1) - 1  # order-preserving output slot of each representative
        if kept is None:
            n_out = int(is_rep.sum(1).max()) if n else 0
        else:
            n_out = kept
            if not torch.compiler.is_compiling() and b and bool((is_rep.sum(1) != kept).any()):
                # eager runs check the promise that compiled graphs rely on
                raise ValueError(f"from_targets(kept={kept}): some sample keeps another count")
        # representatives write their index into their slot; the rest write into a spare column
        src = ar.expand(b, n)
        rep_full = torch.zeros(b, n_out + 1, dtype=torch.long, device=target.device)
        rep_full.scatter_(1, torch.where(is_rep, slot, n_out), src)
        rep = rep_full[:, :n_out]
        dropped = target < 0
        index = slot.gather(1, target.clamp_min(0).flatten(1)).view_as(target)
        if weight is None:
            weight = torch.ones(target.shape, device=target.device)
        weight = weight.masked_fill(dropped, 0.0)
        index = index.masked_fill(dropped, 0)
        if selection is None:
            selection = target.shape[-1] == 1 and bool(
                ((target[..., 0] == ar) | dropped[..., 0]).all()
            )
        return Reduction(
            index=index,
            weight=weight,
            rep=rep,
            mode=mode,
            selection=selection,
            uniform=kept is not None,
        )

    @staticmethod
    def select(keep: Tensor, n_in: int) -> Reduction:
        """Pruning: keep the inputs ``keep`` (``[B, N_out]``, any order), drop the rest."""
        b = keep.shape[0]
        target = torch.full((b, n_in), -1, dtype=torch.long, device=keep.device)
        target.scatter_(1, keep, keep)
        return Reduction.from_targets(target, kept=keep.shape[1], selection=True)

    # ------------------------------------------------------------------ properties
    @property
    def n_in(self) -> int:
        return self.index.shape[1]

    @property
    def n_out(self) -> int:
        return self.rep.shape[1]

    @property
    def k(self) -> int:
        return self.index.shape[2]

    # ------------------------------------------------------------------ application
    def apply_sizes(self, size: Tensor | None) -> Tensor:
        """Sizes of the outputs: ``s'_o = sum_i w_io s_i`` (``size=None`` means all ones)."""
        b = self.index.shape[0]
        mass = self.weight if size is None else self.weight * size.unsqueeze(-1)
        out = torch.zeros(b, self.n_out, dtype=mass.dtype, device=mass.device)
        return out.scatter_add_(1, self.index.flatten(1), mass.flatten(1))

    def apply(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply T to features ``x`` (``[B, N_in, C]``) weighted by ``size``.

        Returns the output features ``[B, N_out, C]`` and output sizes ``[B, N_out]``.
        """
        new_size = self.apply_sizes(size)
        if self.selection:
            y = x.gather(1, self.rep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            return y * (new_size > 0).unsqueeze(-1).to(y.dtype), new_size
        b, n, c = x.shape
        w = self.weight if size is None or self.mode == "sum" else self.weight * size.unsqueeze(-1)
        w = w.to(x.dtype)
        contrib = (x.unsqueeze(2) * w.unsqueeze(-1)).reshape(b, n * self.k, c)
        idx = self.index.reshape(b, n * self.k, 1).expand(-1, -1, c)
        y = x.new_zeros(b, self.n_out, c).scatter_add_(1, idx, contrib)
        if self.mode == "sum":
            return y, new_size
        denom = x.new_zeros(b, self.n_out).scatter_add_(1, idx[..., 0], w.reshape(b, n * self.k))
        y = y / denom.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        if self.mode == "mlerp":
            norms = x.norm(dim=-1, keepdim=True).expand(-1, -1, self.k).reshape(b, n * self.k)
            norms = norms.masked_fill(self.weight.reshape(b, n * self.k) <= 0, 0.0)
            target = x.new_zeros(b, self.n_out).scatter_reduce_(1, idx[..., 0], norms, "amax")
            y = y * (target / y.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
        return y, new_size

    def destination(self) -> tuple[Tensor, Tensor]:
        """``(output, sent)``, both ``[B, N_in]``: the output slot that takes most of each
        input, and whether the input sends anything at all (False: pruned)."""
        best = self.weight.argmax(-1, keepdim=True)
        return self.index.gather(-1, best)[..., 0], self.weight.gather(-1, best)[..., 0] > 0

    def unmerge(self, y: Tensor) -> Tensor:
        """Copy outputs back onto the input grid: ``x_i = sum_o w_io y_o / sum_o w_io``.

        A merged token receives the value of its destination; a pruned token (no mass sent
        anywhere) receives zeros. This is T's transpose with rows renormalised (tomesd's unmerge).
        """
        b, _, c = y.shape
        if self.k == 1:
            out = y.gather(1, self.index.expand(-1, -1, c))
            return out * (self.weight > 0).to(y.dtype)
        g = y.gather(1, self.index.reshape(b, self.n_in * self.k, 1).expand(-1, -1, c)).view(
            b, self.n_in, self.k, c
        )
        w = self.weight.to(y.dtype)
        out = (g * w.unsqueeze(-1)).sum(2)
        return out / w.sum(-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)

    def compose(self, nxt: Reduction, max_k: int = 8) -> Reduction:
        """The map ``nxt ∘ self`` (apply ``self`` first), for source tracking.

        Weights multiply along paths. Soft maps can fan out; at most ``max_k`` destinations per
        input are kept (the largest weights), which is exact for pruning and merging (k = 1).
        """
        b, flat = self.index.shape[0], self.n_in * self.k  # explicit sizes: b may be 0
        idx2 = nxt.index.gather(1, self.index.reshape(b, flat, 1).expand(-1, -1, nxt.k))
        w2 = nxt.weight.gather(1, self.index.reshape(b, flat, 1).expand(-1, -1, nxt.k))
        index = idx2.reshape(b, self.n_in, self.k * nxt.k)
        weight = (w2 * self.weight.reshape(b, flat, 1)).reshape(b, self.n_in, self.k * nxt.k)
        if index.shape[-1] > max_k:
            weight, top = weight.topk(max_k, dim=-1)
            index = index.gather(-1, top)
        rep = self.rep.gather(1, nxt.rep)
        return Reduction(index=index, weight=weight, rep=rep, selection=False)
