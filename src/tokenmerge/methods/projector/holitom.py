"""HoliTom: temporal segmentation, temporal and spatial merging of a clip, and the in-LLM merge."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.reduction import Reduction
from ..base import register
from ..decoder import HoliTomInner
from .base import ProjectorMethod, VisualTokens, top_k

#: HoliTom's in-LLM merge layer on its 28-layer Qwen2 LLMs (``HOLITOM_k=18``), as a share of depth
INNER_DEPTH = 18 / 28


def segments(sim: Tensor, tau: float, max_window: int) -> list[tuple[int, int]]:
    """HoliTom's global temporal segmentation: frames ``[s, e]`` (inclusive) covering the clip.

    ``sim[t, p]`` is the cosine of position ``p`` between frames ``t`` and ``t + 1``. A window
    ``[s, e]`` removes ``static(s, e) = (e - s) · |{p : sim[t, p] > τ for s <= t < e}|`` tokens
    (each static position becomes one token). The dynamic programme
    ``dp[e] = max(dp[e-1], max_{2 <= w <= W} dp[e-w] + static(e-w+1, e))`` maximises the tokens
    removed; ties keep the shorter window (HoliTom's strict ``>``)."""
    f = sim.shape[0] + 1
    above = (sim > tau).cpu()
    static = torch.zeros(f, f, dtype=torch.long)  # static[s, e]
    for s in range(f - 1):
        still = above[s:].long().cumprod(0).sum(1)  # positions static over [s, s + 1 + j]
        static[s, s + 1 :] = still * torch.arange(1, f - s)
    dp, start = [0] * f, [0] * f
    for e in range(f):
        best, start[e] = dp[e - 1] if e > 0 else 0, e
        for w in range(2, min(e + 1, max_window) + 1):
            s = e - w + 1
            val = (dp[s - 1] if s > 0 else 0) + int(static[s, e])
            if val > best:
                best, start[e] = val, s
        dp[e] = best
    out, e = [], f - 1
    while e >= 0:
        out.append((start[e], e))
        e = start[e] - 1
    return out[::-1]


def dpc_knn(x: Tensor, c: int, k: int) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN), as HoliTom uses it.

    With ``d_ij = ||x_i - x_j|| / sqrt(C)``: density ``ρ_i = exp(-mean_{j ∈ kNN(i)} d_ij²)``
    (the ``k`` nearest, ``i`` itself included), ``δ_i = min_{j: ρ_j > ρ_i} d_ij`` (the largest
    ``d`` for the densest), centres = the ``c`` largest ``ρ_i δ_i``, and every token joins its
    nearest centre. Ties go to the lower index (HoliTom adds 1e-6 noise instead).
    Returns ``(centres [c] in token order, assign [M]: the centre index of every token)``."""
    m = x.shape[0]
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    near = d.topk(min(k, m), dim=1, largest=False).values
    rho = torch.exp(-(near**2).mean(1))
    ar = torch.arange(m, device=x.device)
    denser = (rho[None, :] > rho[:, None]) | (
        (rho[None, :] == rho[:, None]) & (ar[None] < ar[:, None])
    )
    delta = torch.where(denser, d, torch.inf).amin(1)
    delta = torch.where(torch.isinf(delta), d.max(), delta)
    every = torch.ones(1, m, dtype=torch.bool, device=x.device)
    centres = top_k((rho * delta)[None], every, torch.tensor([c], device=x.device))[0]
    centres = centres.nonzero()[:, 0]
    assign = d[:, centres].argmin(1)
    assign[centres] = torch.arange(len(centres), device=x.device)  # a centre is its own
    return centres, assign


def allot(sizes: list[int], total: int) -> list[int]:
    """``total`` split over groups in proportion to their ``sizes`` (largest remainder; ties to
    the earlier group), never more than a group holds."""
    n = sum(sizes)
    share = [s * total / n for s in sizes]
    out = [math.floor(q) for q in share]
    order = sorted(range(len(sizes)), key=lambda g: (-(share[g] - out[g]), g))
    for g in order[: total - sum(out)]:
        out[g] += 1
    return out


@register
@dataclass
class HoliTom(ProjectorMethod):
    """HoliTom (Shao, Wang, Wang, Zhang, Wang, "HoliTom: Holistic Token Merging for Fast Video
    Large Language Models", NeurIPS 2025, arXiv:2505.21334): a clip's visual tokens merged
    before the LLM (outer-LLM), then again inside it (inner-LLM), as one method.

    **Outer-LLM**, per clip of ``F`` frames with ``P`` tokens each (``x_{t,p}``):

    1. *segmentation*: ``s_{t,p} = cos(x_{t,p}, x_{t+1,p})``; :func:`segments` splits the clip
       into windows that maximise the tokens removed by step 2 (window length ``<= max_window``);
    2. *temporal merge*: in a window ``[s, e]``, a position is *static* when
       ``s_{t,p} > τ`` for every ``s <= t < e``; its ``e - s + 1`` tokens become their mean;
    3. *spatial merge*: with ``n'`` tokens left and a budget of ``keep``, every group (the
       static tokens of a window; the dynamic tokens of each frame) keeps its share
       ``≈ keep · n_g / n'``. In a dynamic group the ``dominant`` share of it are the tokens of
       largest vision-tower saliency; the rest are DPC-kNN centres (:func:`dpc_knn`) of the
       remaining tokens, each the merge ``β x_c + (1 - β) mean_{i → c} x_i`` of its centre and
       the tokens nearest to it. A static group is all DPC-kNN centres.

    **Inner-LLM**: :class:`~tokenmerge.methods.decoder.HoliTomInner` at layer ``K`` removes
    ``inner_ratio`` of the visual tokens that entered the LLM (FastV's selection, dropped
    tokens averaged into their most similar kept token).

    **Defaults** are HoliTom's: ``τ = 0.8`` (``T``), ``D = 0`` (all dynamic tokens dominant),
    ``β = 0.6``, ``k = 7``, windows unbounded (``MAX_WINDOW_SIZE=1024``), and the inner merge
    ``HOLITOM_k=18, HOLITOM_r=0.5`` of 28 layers: ``K = round(18/28 · depth)``, ratio 0.5.

    **Budget.** ``ratio`` is the outer stage's: HoliTom rescales its retain ratio by the tokens
    the temporal merge removed (``r' = min(r·n/n', 1)``); here the ``keep`` tokens are split
    over the groups exactly (largest remainder; HoliTom rounds per group), so a clip keeps
    ``min(keep, n')`` tokens: fewer than ``keep`` when the temporal merge alone removes more
    (``exact_counts = False``). On an image (one frame) only step 3 runs.

    **Positions.** A static token keeps the position of its centre in the window's first frame
    (HoliTom places it there); a dominant token its own; a contextual one its centre's.
    Protected tokens (OneVision's newline) are kept.
    """

    name: ClassVar[str] = "holitom"
    visual_needs: ClassVar[frozenset[str]] = frozenset({"saliency"})
    exact_counts: ClassVar[bool] = False

    tau: float = 0.8
    max_window: int = 1024
    dominant: float = 1.0
    beta: float = 0.6
    knn: int = 7
    inner_ratio: float = 0.5
    inner_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "tau": -1.0 <= self.tau <= 1.0,
            "max_window": self.max_window >= 1,
            "dominant": 0.0 <= self.dominant <= 1.0,
            "beta": 0.0 <= self.beta <= 1.0,
            "knn": self.knn >= 1,
            "inner_ratio": 0.0 <= self.inner_ratio < 1.0,
            "inner_layer": self.inner_layer is None or self.inner_layer >= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"HoliTom.{field}={getattr(self, field)!r} is out of range (tau in [-1, 1], "
                    "max_window >= 1, dominant and beta in [0, 1], knn >= 1, inner_ratio in "
                    "[0, 1), inner_layer >= 1 or None)"
                )

    @classmethod
    def example(cls, r: int) -> HoliTom:
        """``r == 0``: keep everything (both stages off); otherwise HoliTom's defaults at
        ``ratio = 0.75``."""
        return cls(ratio=0.0, inner_ratio=0.0) if r == 0 else cls(ratio=0.75)

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0 and self.inner_ratio == 0.0

    def inner(self, depth: int) -> HoliTomInner | None:
        """The in-LLM stage for an LLM of ``depth`` layers (``None`` when ``inner_ratio = 0``)."""
        if self.inner_ratio == 0.0:
            return None
        k = round(INNER_DEPTH * depth) if self.inner_layer is None else self.inner_layer
        return HoliTomInner(ratio=self.inner_ratio, layer=min(max(k, 1), depth - 1))

    def select(self, v: VisualTokens, keep: Tensor) -> Reduction:
        if v.saliency is None:
            raise ValueError("HoliTom needs the vision tower's saliency (v.saliency)")
        u, n = v.valid.shape
        ar = torch.arange(n, device=v.x.device)
        target = torch.where(v.valid, ar, -1).expand(u, n).clone()
        weight = torch.ones(u, n, dtype=torch.float32, device=v.x.device)
        frames = v.frames if v.frames is not None else torch.ones(u, dtype=torch.long)
        for row in range(u):
            self._row(v, row, int(frames[row]), int(keep[row]), target[row], weight[row])
        return Reduction.from_targets(target, weight)

    def _row(
        self, v: VisualTokens, row: int, f: int, keep: int, target: Tensor, weight: Tensor
    ) -> None:
        """Fill one clip's ``target`` / ``weight`` (``from_targets``' arguments) in place."""
        cand = v.candidates[row]
        x = v.x[row].float()
        target[cand] = -1
        if f == 1:  # an image (its AnyRes tiles included): one dynamic group
            tok = cand.nonzero()[:, 0][None]
            self._merge(x, tok, False, min(keep, tok.shape[1]), v.saliency[row], target, weight)
            return
        part, coord = v.part[row], v.coord[row]
        cols = int(v.grid[row, 0, 1])
        cell = coord[:, 0] * cols + coord[:, 1]
        p = int(v.grid[row, 0, 0]) * cols
        table = torch.full((f, p), -1, dtype=torch.long, device=cand.device)  # [frame, cell]
        ok = cand & (part < f)
        table[part[ok], cell[ok]] = ok.nonzero()[:, 0]
        if bool((table < 0).any()) or int(cand.sum()) != f * p:
            raise ValueError("HoliTom needs every frame of a clip on one full grid")
        feat = x[table]  # [F, P, C]
        unit = torch.nn.functional.normalize(feat, dim=-1)
        sim = (unit[:-1] * unit[1:]).sum(-1)  # [F-1, P]
        # groups: (tokens [L, P'] as table entries, is_static); a static group's token is a
        # position's mean over its window, a dynamic group's one frame's token
        groups: list[tuple[Tensor, bool]] = []
        for s, e in segments(sim, self.tau, self.max_window):
            static = (sim[s:e] > self.tau).all(0) if e > s else torch.zeros(p, dtype=torch.bool)
            if bool(static.any()):
                groups.append((table[s : e + 1][:, static], True))
            for t in range(s, e + 1):
                groups.append((table[t : t + 1][:, ~static], False))
        sizes = [int(g.shape[1]) for g, _ in groups]
        quota = allot(sizes, keep) if keep < sum(sizes) else sizes
        for (tok, is_static), q in zip(groups, quota, strict=True):
            if q > 0:
                self._merge(x, tok, is_static, q, v.saliency[row], target, weight)

    def _merge(
        self,
        x: Tensor,
        tok: Tensor,
        is_static: bool,
        q: int,
        saliency: Tensor,
        target: Tensor,
        weight: Tensor,
    ) -> None:
        """Keep ``q`` tokens of one group (``tok``: ``[L, M]`` table entries, ``L`` frames of
        ``M`` positions), writing where every original token goes and its weight."""
        length, m = tok.shape
        rep = tok[0]  # a position's token in the window's first frame stands for it
        if q >= m and length == 1:
            target[rep] = rep
            weight[rep] = 1.0
            return
        g = x[tok].mean(0)  # [M, C] the group's tokens (a static position: its window mean)
        dom = torch.zeros(m, dtype=torch.bool, device=x.device)
        n_dom = 0 if is_static else round(q * self.dominant)
        if n_dom:
            n_dom_t = torch.tensor([n_dom], device=x.device)
            dom = top_k(saliency[rep][None], torch.ones_like(dom)[None], n_dom_t)[0]
        rest = (~dom).nonzero()[:, 0]
        c = min(q - n_dom, len(rest))
        centre_of = torch.arange(m, device=x.device)  # per position: its centre (itself if kept)
        member = torch.zeros(m, dtype=torch.bool, device=x.device)
        kept = dom.clone()
        if c > 0:
            centres, assign = dpc_knn(g[rest], c, min(self.knn, c))
            centre = rest[centres]
            centre_of[rest] = centre[assign]
            member[rest] = True
            member[centre] = False
            kept[centre] = True
        count = torch.bincount(centre_of[member], minlength=m).float()
        beta = torch.where(count > 0, self.beta, 1.0)
        w = torch.where(member, (1.0 - beta[centre_of]) / count[centre_of].clamp_min(1), beta)
        go = kept | member
        target[tok[:, go]] = rep[centre_of][go]  # every frame's token of a position alike
        weight[tok[:, go]] = w[go] / length
