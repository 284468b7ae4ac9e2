"""Quality measures that compare a reduced model with the unreduced one on the same inputs.

Accuracy differences of a point or two are noise at a few hundred samples; decision agreement
(same prediction as the unreduced model) and the tail of the feature cosine are not, so every
figure comes with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A mean over samples with its standard error."""

    value: float
    se: float


def proportion(hits: np.ndarray) -> Estimate:
    """Share of True in ``hits`` with the binomial standard error."""
    n = len(hits)
    p = float(np.mean(hits))
    return Estimate(p, math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))


def paired_difference(a: np.ndarray, b: np.ndarray) -> Estimate:
    """Mean of ``a - b`` over paired samples (e.g. correct-reduced minus correct-base)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return Estimate(
        float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    )


def bootstrap_se(
    values: np.ndarray,
    stat: Callable[..., np.ndarray] = np.mean,
    resamples: int = 200,
    seed: int = 0,
) -> float:
    """Bootstrap standard error of ``stat`` over the samples in ``values`` (1-D).

    ``stat(x, axis=-1)`` must reduce the last axis, e.g. ``np.mean`` or
    ``functools.partial(np.percentile, q=5)``: all ``resamples`` resamples (drawn with
    replacement, seeded) are evaluated in one call. For a tail statistic such as the 5th
    percentile, where no closed form applies.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected 1-D values, got shape {x.shape}")
    if len(x) < 2:
        return 0.0
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    return float(np.std(stat(x[idx], axis=-1), ddof=1))


def cosine(a: Tensor, b: Tensor) -> np.ndarray:
    """Per-row cosine similarity of two ``[n, d]`` feature sets."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


def knn_predict(bank: Tensor, labels: Tensor, k: int = 20, temperature: float = 0.07) -> Tensor:
    """Leave-one-out weighted k-NN on cosine similarity (DINO's protocol, Caron et al. 2021).

    Each sample is classified by its ``k`` nearest *other* samples, each voting
    ``exp(cos / T)`` for its label.
    """
    f = torch.nn.functional.normalize(bank.double(), dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    k = min(k, len(f) - 1)
    top, idx = sim.topk(k, dim=-1)
    votes = torch.zeros(len(f), int(labels.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, labels[idx], (top / temperature).exp())
    return votes.argmax(-1)


def probe_predict(
    train: np.ndarray, y: np.ndarray, tests: list[np.ndarray], folds: int = 5, seed: int = 0
) -> list[np.ndarray]:
    """Cross-fitted linear probe: a logistic regression trained on ``train`` features.

    For every fold, a probe fitted on the other folds of ``train`` predicts the held-out samples
    of each array in ``tests`` (the unreduced features and any reduced ones), so every sample
    is a test sample exactly once and the probe never sees the reduced features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = [np.empty(len(y), dtype=np.int64) for _ in tests]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in cv.split(train, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        clf.fit(train[tr], y[tr])
        for o, t in zip(out, tests, strict=True):
            o[te] = clf.predict(t[te])
    return out


def pearson(a: Tensor, b: Tensor) -> np.ndarray:
    """Per-image Pearson correlation of two ``[n, H, W]`` maps."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).numpy()


def top_iou(a: Tensor, b: Tensor, frac: float = 0.1) -> np.ndarray:
    """Per-image IoU of the top ``frac`` pixels of two ``[n, H, W]`` maps."""
    a, b = a.flatten(1), b.flatten(1)
    k = max(1, int(frac * a.shape[1]))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, 1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, 1).indices, True)
    return ((ma & mb).sum(1) / (ma | mb).sum(1)).double().numpy()
