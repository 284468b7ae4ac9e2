"""The diffusion bench's Markdown report (what was timed and on what weights, a speed table,
a fidelity table on the tiny models) and its plot (speed-up against ratio, a line per
resolution and batch size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cpuload import LOADED_CORES

#: the speed table
SPEED: list[tuple[str | tuple[str, str], str]] = [
    ("resolution", "resolution (px)"),
    ("batch", "batch"),
    ("ratio", "ratio"),
    ("tokens_text", "tokens in the finest patched block"),
    ("levels_text", "patched blocks"),
    ("base_s", "unpatched step (s)"),
    ("patched_s", "patched step (s)"),
    (("speedup", "speedup_iqr"), "speed-up (IQR)"),
    ("note", "note"),
]
#: the fidelity table
FIDELITY: list[tuple[str | tuple[str, str], str]] = [
    ("model", "tiny model"),
    ("family", "diffusers class"),
    ("ratio", "ratio"),
    ("tokens_text", "tokens in the finest patched block"),
    ("levels_text", "patched blocks"),
    ("cosine", "cosine (mean)"),
    ("cosine_min", "cosine (lowest)"),
    ("gap_text", "1 − cosine (mean)"),
]

_ABOUT = {
    "sd15-unet-random": "Stable Diffusion 1.5's UNet architecture (`runwayml/stable-diffusion-"
    "v1-5`'s unet config)",
    "sdxl-unet-random": "SDXL base 1.0's UNet architecture (`stabilityai/stable-diffusion-xl-"
    "base-1.0`'s unet config)",
}


def _tokens(row: dict[str, Any]) -> str:
    if row.get("tokens") is None:
        return "none recorded"
    return f"{row['tokens']} → {row['kept']}"


def _levels(row: dict[str, Any]) -> str:
    return "; ".join(
        f"{g['blocks']} at 1/{g['downsample']}: {g['tokens']} → {g['kept']}"
        for g in row.get("levels") or []
    )


def _with_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        dict(
            r,
            tokens_text=_tokens(r),
            levels_text=_levels(r),
            note="within noise" if r.get("within_noise") else "",
            # random weights keep the cosine near 1: the gap shows the differences
            gap_text=f"{1 - r['cosine']:.1e}" if "cosine" in r else "",
        )
        for r in rows
    ]


def _weights(cfg: Any, result: dict[str, Any]) -> str:
    """What was timed, and what its weights are."""
    n = result["params"] / 1e6
    if cfg.model.startswith("hf:"):
        return (
            f"Timed: the UNet of `{cfg.model[3:]}` ({n:.1f}M parameters), with the weights "
            "loaded from there.\n"
        )
    about = _ABOUT.get(cfg.model, cfg.model)
    if result["timed_model"] != cfg.model:
        return (
            f"**Smoke test: the weights are random and the model is tiny.** Timed: "
            f"`{result['timed_model']}`, a tiny UNet of {cfg.model}'s layout ({n:.1f}M "
            "parameters, random weights) in place of the full one (`bench.arch=tiny`); its "
            "speed-ups say nothing about the full-size model.\n"
        )
    return (
        f"**The weights are random.** Timed: {about}, {n:.1f}M parameters, with diffusers' "
        "default random initialisation: no Stable Diffusion weights ship offline. The time of "
        "a step does not depend on the weights' values, so these speed-ups are those of the "
        "trained model at the same sizes; its outputs mean nothing, which is why fidelity is "
        "measured apart, on tiny models.\n"
    )


def _method(result: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in result["method"].items())
    return (
        "Method: ToMeSD (tomesd-style token merging, Bolya & Hoffman 2023). In each patched "
        "transformer block, the share `ratio` of the tokens merges into destinations drawn one "
        "per `sx × sy` cell of the latent grid before the chosen sub-layers and is copied back "
        f"after them; the residual stream keeps every token. Settings: {shown}. "
        "`max_downsample=None` patches the finest UNet level that has attention.\n"
    )


def _load(result: dict[str, Any]) -> str:
    load = result.get("other_load")
    if load is None:
        return ""
    loaded = " — **the machine was loaded**: read the speed-ups as rough" * (load > LOADED_CORES)
    return (
        f"Other processes took up to {load:.2f} cores (mean {result['other_load_mean']:.2f}) "
        f"during the timed pairs{loaded}.\n"
    )


def markdown(cfg: Any, result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report of a run."""
    from .. import report

    m = meta["machine"]
    out = [
        f"# tokenmerge bench: {cfg.model} (ToMeSD in a diffusion denoiser)\n",
        _weights(cfg, result),
        _method(result),
        "## Speed\n",
        "A step is one forward of the denoiser under `torch.inference_mode` on random "
        "latents `[B, 4, H/8, W/8]`, a timestep and 77 text embeddings (SDXL: also its pooled "
        "text embedding and size conditioning). The patched model is timed against the "
        "unpatched one (stock diffusers attention) on the same inputs, in interleaved pairs: "
        f"{cfg.timing_runs} timed pair(s) per row, after {cfg.timing_warmup} warm-up pair(s) "
        "before each resolution and batch size's first ratio; the "
        "speed-up is the median of the pairs' ratios (interquartile range); a row whose range "
        "holds 1.0 is *within noise*: no measurable speed-up. The step times are medians. "
        f"Device {m.get('device', 'cpu')}, {cfg.dtype}.\n",
        _load(result),
        report.table(_with_text(result["rows"]), SPEED),
    ]
    fid = result.get("fidelity") or []
    measured = [r for r in fid if "skipped" not in r]
    skipped = [r for r in fid if "skipped" in r]
    if fid:
        out += [
            "## Fidelity (tiny random models)\n",
            "The cosine similarity between the patched and the unpatched outputs of one step, "
            f"per input ({cfg.fidelity_inputs} random inputs at each model's own "
            "resolution), on tiny configurations with random weights of each family the "
            "adapter patches. It says how much a ratio perturbs the computation, not what it "
            "does to images.\n",
            report.table(_with_text(measured), FIDELITY),
        ]
        out += [
            f"- not measured: {r['model']} at ratio {r['ratio']}: {r['skipped']}" for r in skipped
        ]
        out += [""] if skipped else []
    out += [
        f"Machine: {m['platform']}, {m['processor']}.\n",
        report.footer(meta),
    ]
    return "\n".join(out)


def plot(cfg: Any, result: dict[str, Any], path: Path) -> None:
    """Speed-up against ratio, a line per resolution and batch size, with the interquartile
    range of the timed pairs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    settings = list(dict.fromkeys((r["resolution"], r["batch"]) for r in rows))
    for i, (res, bs) in enumerate(settings):
        mine = sorted(
            (r for r in rows if (r["resolution"], r["batch"]) == (res, bs)),
            key=lambda r: r["ratio"],
        )
        xs = [r["ratio"] for r in mine]
        ys = [r["speedup"] for r in mine]
        iqr = [r.get("speedup_iqr") or (r["speedup"],) * 2 for r in mine]
        ax.errorbar(
            xs,
            ys,
            yerr=[[y - q[0] for y, q in zip(ys, iqr, strict=True)],
                  [q[1] - y for y, q in zip(ys, iqr, strict=True)]],
            marker="os^vD"[i % 5],
            color=plt.get_cmap("tab10")(i % 10),
            capsize=2,
            label=f"{res} px, batch {bs}",
        )  # fmt: skip
    ax.axhline(1.0, color="black", ls="--", lw=1, label="unpatched")
    ax.set_xlabel("ToMeSD ratio (share of each patched block's tokens merged)")
    ax.set_ylabel("step speed-up vs unpatched (median, IQR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    timed = result["timed_model"]
    weights = "random weights" if not cfg.model.startswith("hf:") else "its own weights"
    ax.set_title(f"{timed} ({weights}): one denoising step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
