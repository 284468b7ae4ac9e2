"""tokenmerge's command line: bench | bench-compile | bench-profile | visualize | tune | report |
list, a thin layer over tokenmerge.eval. Every argument is checked before a model loads; an
error is one line on stderr and exit status 2 (--debug shows the traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.budget import budget_label, parse_budget
from ..eval.distributed import launched
from ..zoo import CATALOG
from . import tune
from .checks import (
    ERRORS,
    HUB_FORMS,
    OUT,
    CLIError,
    check_image,
    check_methods,
    check_model,
    few_tokens,
    few_tokens_message,
    positive,
    warn,
    warn_few_tokens,
    zoo_tokens,
)


def _bench(args: argparse.Namespace) -> int:
    kind = check_model(args.model, args.kind)
    if args.full and args.quick:
        raise SystemExit("--full and --quick exclude each other")
    for flag in ("baselines", "autotune", "plan", "full"):
        if flag == "full" and kind == "vlm":
            continue
        if getattr(args, flag) not in (None, False) and kind != "vision":
            raise SystemExit(f"--{flag} applies to vision benchmarks, not to {kind} ones")
    if launched() and kind not in ("vision", "llm"):
        raise SystemExit(
            "a distributed run (torchrun, accelerate launch) shares out vision and LLM "
            f"benchmarks only; run the {kind} benchmark in one process"
        )
    # the VLM, audio and diffusion benches' entry points live in their cli modules (their
    # packages hold the data and the report too)
    package = kind in ("vlm", "audio", "diffusion")
    module = importlib.import_module(f"tokenmerge.eval.{kind}" + (".cli" if package else ""))
    return module.cli_main(args)


def _visualize(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..api import apply, state
    from ..eval.visualize import letterbox, save_overlay
    from ..methods import get_method

    # every argument checked before the model loads
    check_model(args.model, "vision", "visualize")
    check_methods([args.method], "--method")
    img = check_image(args.image)
    budget = parse_budget(args.budget)
    method = get_method(args.method, r=budget)
    out = Path(args.out or str(Path(args.image).with_suffix("")) + f"-{args.method}.png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {str(out)!r}: no folder {str(out.parent)!r}")
    warn_few_tokens(args.model, [(args.method, budget)])

    from ..eval import zoo

    vm = zoo.load_vision(args.model, backend=args.backend)
    square, box = letterbox(img, vm.image_size)  # padded, not cropped: the whole image is seen
    pixels = vm.preprocess([square], resize="squash")
    apply(vm.model, method)
    with torch.inference_mode():
        vm.tokens(pixels)
    st = state(vm.model)
    counts = [float(c[0]) for c in st.tokens_per_layer]
    low = few_tokens(counts)
    if low is not None and zoo_tokens(args.model) is None:  # zoo models were warned about above
        warn(few_tokens_message(args.method, budget, args.model, st.n_orig, *low))
    # the image exactly as the model saw it (undo the normalisation)
    mean = torch.tensor(vm.mean).view(3, 1, 1)
    std = torch.tensor(vm.std).view(3, 1, 1)
    seen = ((pixels[0] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    padded = " (letterboxed)" if box[2:] != (vm.image_size, vm.image_size) else ""
    caption = (
        f"{args.method} {budget_label(budget)} on {args.model}{padded}: "
        f"{st.n_orig} -> {counts[-1]:.0f} tokens after {len(counts)} layers"
    )
    save_overlay(np.ascontiguousarray(seen), st, str(out), caption=caption)
    print(f"wrote {out} ({caption})")
    return 0


def _diagnostic(module: str, command: str) -> Callable[[argparse.Namespace], int]:
    """bench-compile / bench-profile: the arguments checked, then the module's ``cli_main``."""

    def run(args: argparse.Namespace) -> int:
        check_model(args.model, "vision", command)
        check_methods([args.method], "--method")
        budgets = [parse_budget(b) for b in args.budgets.split(",")]
        if getattr(args, "dataset", None) is not None:
            from ..eval.vision.measure import check_datasets

            check_datasets([args.dataset])
        warn_few_tokens(args.model, [(args.method, b) for b in budgets])
        return importlib.import_module(module).cli_main(args)

    return run


def _report(args: argparse.Namespace) -> int:
    import json

    from ..eval.audio.cli import render as render_audio
    from ..eval.diffusion.cli import render as render_diffusion
    from ..eval.llm.cli import render
    from ..eval.vision.cli import render as render_vision
    from ..eval.vlm.cli import render as render_vlm

    for name in args.json:
        path = Path(name)
        if path.suffix != ".json" or not path.is_file():
            raise SystemExit(f"{name!r} is not a saved bench result (a .json file)")
        meta = json.loads(path.read_text()).get("meta", {})
        config = meta.get("config") or {}
        if "dataset" in config:
            raise SystemExit(
                f"{name!r} is a single-dataset vision run from before the per-dataset report; "
                "rerun the command in its 'meta' to remake it"
            )
        if "datasets" in config:  # a vision run
            written = render_vision(path)
        elif config.get("bench") == "vlm":
            written = render_vlm(path)
        elif config.get("bench") == "audio":
            written = render_audio(path)
        elif config.get("bench") == "diffusion":
            written = render_diffusion(path)
        elif "factors" in config:  # an LLM run
            path.with_suffix(".md").write_text(render(path))
            written = [".md"]
        else:  # the text bench, bench-compile, bench-profile: their reports are written once
            raise SystemExit(
                f"{name!r} was written by `{meta.get('command', 'an unknown command')}`, whose "
                "report is not remade from its JSON (the vision, LLM, VLM, speech and diffusion "
                "benches' are); rerun that command to remake it"
            )
        print(f"wrote {path.with_suffix('')}" + ", ".join(written))
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..api import supported_families
    from ..methods import REGISTRY
    from ..zoo import describe

    print("methods:")
    for name, cls in sorted(REGISTRY.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
        print(f"  {name:18s} {doc}")
    print("model families:")
    for line in supported_families():
        print(f"  {line}")
    print("offline zoo (tokenmerge.zoo.load(NAME); hf:NAME / timm:NAME: a hub id or a folder):")
    for name in CATALOG:
        print(f"  {describe(name)}")
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it names one itself or has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and all(action.default is not v for v in (None, False, argparse.SUPPRESS))
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``tokenmerge bench: error: ...``), exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        sub = super().add_subparsers(**kwargs)
        add = sub.add_parser

        def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
            kw.setdefault("description", kw.get("help"))  # `tokenmerge CMD --help` says it too
            return add(name, **kw)

        sub.add_parser = add_parser  # type: ignore[method-assign]
        return sub

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _diagnostic_args(p: argparse.ArgumentParser, budgets: str, batch_size: int, stem: str) -> None:
    """The options shared by the one-model vision diagnostics (bench-compile, bench-profile)."""
    p.add_argument("--model", default="dinov2-s", help=f"a vision zoo name, or {HUB_FORMS}")
    p.add_argument("--backend", default="hf", choices=["hf", "timm"], help="dinov2-s's framework")
    p.add_argument("--method", default="tome", help="a registered block method (tokenmerge list)")
    p.add_argument(
        "--budgets",
        default=budgets,
        help="comma-separated budgets: 8 (tokens removed per layer), 16:-1, list:8/8/4, "
        "keep:0.9, tokens:64, flops:0.5",
    )
    p.add_argument("--batch-size", type=positive, default=batch_size, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=OUT, help="output folder (relative to the current one)")
    p.add_argument("--name", help=f"file stem of the outputs (default: {stem}-MODEL-BACKEND)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokenmerge", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="benchmark methods × budgets against the unreduced model")
    b.add_argument(
        "--model", default="dinov2-s", help=f"a zoo name (tokenmerge list), or {HUB_FORMS}"
    )
    b.add_argument(
        "--kind",
        choices=["vision", "text", "llm", "vlm", "audio", "diffusion"],
        help="the kind of a hf:/timm: model (default: the zoo model's own)",
    )
    b.add_argument(
        "--backend", default="hf", choices=["hf", "timm"], help="vision: dinov2-s's framework"
    )
    b.add_argument(
        "--methods",
        help="comma-separated registered methods (default: tome; LLMs: snapkv,pyramidkv,...; "
        "VLMs: every projector and decoder method; whisper-tiny-en: tome,pitome,dtome,random,"
        "truncate)",
    )
    b.add_argument(
        "--budgets",
        help="comma-separated budgets: 8 (tokens removed per layer), 16:-1, list:8/8/4, "
        "keep:0.9 (per layer), tokens:64, flops:0.5; LLMs: compression factors 2,4,8; "
        "VLMs: visual tokens kept per image, 85,57,28,16; VLM --tasks video: %% of each clip's "
        "visual tokens kept, 50,25,10,5; whisper-tiny-en: tokens left after the encoder, "
        "750,375,188,94; diffusion: ToMeSD ratios 0.3,0.5,0.6 (default: the preset's)",
    )
    b.add_argument(
        "--budgets-for",
        action="append",
        help="METHOD=B1,B2: budgets for one method (overrides --budgets for it; repeatable; "
        "default: none)",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke-test size (minutes on 2 cores; default: off)",
    )
    b.add_argument(
        "--full",
        action="store_true",
        help="vision: the published size (n=1000 per data set, ToMe r=8,12,16,20, six input "
        "sizes; about an hour on 2 cores) instead of the default quick look (about 5 minutes); "
        "VLMs: 500 questions instead of 100",
    )
    b.add_argument(
        "--param",
        action="append",
        help="METHOD.NAME=VALUE: a method's hyper-parameter, e.g. tome.prop_attn=false "
        "(repeatable; LLMs, Whisper and diffusion also take bench.NAME=VALUE settings, e.g. "
        "bench.resolutions=512,1024; default: none)",
    )
    b.add_argument(
        "--tasks",
        help="comma-separated subset of the tasks (default: all; vision: "
        "cosine,knn,probe,saliency,speed; text: cosine,retrieval,probe,speed; LLMs: "
        "needle,ppl,memory,speed; VLMs: accuracy,speed, plus video to ask about video clips "
        "instead of images (alone: with accuracy,speed; frames per clip: --param "
        "bench.frames=8))",
    )
    b.add_argument(
        "--dataset",
        help="comma-separated data sets (default: all; vision: textiles, photos, "
        "fashion-mnist; text: tweets, reviews, docs; LLMs: austen, mobydick, jargon, pydocs)",
    )
    b.add_argument(
        "--n",
        "--samples",  # torchrun's parser takes --n for an abbreviation of its own options
        dest="n",
        type=positive,
        help="samples for the quality tasks (vision: per data set, default 96; --full 1000; "
        "VLMs: questions, balanced over the question types, default 100; --full 500; "
        "whisper-tiny-en: speech clips, default 110; diffusion: random inputs per tiny model, "
        "default 4)",
    )
    b.add_argument("--batch-size", type=positive, help="batch size (default: the preset's)")
    b.add_argument("--timing-runs", type=positive, help="interleaved timing pairs (default: 5)")
    b.add_argument(
        "--saliency-images", type=positive, help="vision: images for saliency (default: 32)"
    )
    b.add_argument(
        "--baselines",
        help="vision: baselines run beside the methods, downsample,random (default) or none; "
        "--budgets-for downsample=182,168 sets the input sides",
    )
    b.add_argument(
        "--autotune",
        help="vision: comma-separated measured speed-ups (e.g. 1.5,2) to autotune for on each "
        "data set's calibration images; one 'autotune' row each (default: none)",
    )
    b.add_argument(
        "--autotune-methods", help="vision: methods the autotuner may choose (default: tome)"
    )
    b.add_argument(
        "--autotune-time", type=float, help="vision: seconds per autotune search (default: 240)"
    )
    b.add_argument(
        "--plan",
        action="append",
        help="vision: a plan JSON from `tokenmerge tune` to measure (repeatable; default: none)",
    )
    b.add_argument("--seed", type=int, default=0, help="random seed")
    b.add_argument("--out", default=OUT, help="output folder (relative to the current one)")
    b.add_argument("--name", help="file stem of the outputs (default: MODEL-BACKEND)")
    b.set_defaults(func=_bench)

    v = sub.add_parser("visualize", help="draw the merge groups of one image as a PNG")
    v.add_argument(
        "image", help="the image file (non-square images are padded to the model's square input)"
    )
    v.add_argument("--method", default="tome", help="a registered block method (tokenmerge list)")
    v.add_argument(
        "--budget",
        default="16",
        help="one budget: 16 (tokens removed per layer), 16:-1, list:8/8/4, keep:0.9, "
        "tokens:64, flops:0.5",
    )
    v.add_argument("--model", default="dinov2-s", help=f"a vision zoo name, or {HUB_FORMS}")
    v.add_argument("--backend", default="hf", choices=["hf", "timm"], help="dinov2-s's framework")
    v.add_argument("--out", help="output PNG (default: IMAGE-METHOD.png next to the image)")
    v.set_defaults(func=_visualize)

    c = sub.add_parser(
        "bench-compile", help="torch.compile versus eager, unpatched and patched (vision)"
    )
    _diagnostic_args(c, budgets="8,16", batch_size=16, stem="compile")
    c.add_argument("--rounds", type=positive, default=10, help="timed rounds")
    c.set_defaults(func=_diagnostic("tokenmerge.eval.compiled", "bench-compile"))

    pr = sub.add_parser(
        "bench-profile", help="CPU time per operator group, unpatched and patched (vision)"
    )
    _diagnostic_args(pr, budgets="16,20", batch_size=32, stem="profile")
    pr.add_argument(
        "--dataset", default="textiles", help="the images: textiles, photos or fashion-mnist"
    )
    pr.add_argument("--calls", type=positive, default=3, help="profiled calls")
    pr.set_defaults(func=_diagnostic("tokenmerge.eval.profiled", "bench-profile"))

    r = sub.add_parser(
        "report", help="remake a bench's Markdown (vision: and plot) from its saved JSON"
    )
    r.add_argument("json", nargs="+", help="<name>.json written by `tokenmerge bench`")
    r.set_defaults(func=_report)

    tune.add_parser(sub)

    ls = sub.add_parser("list", help="list the registered methods and model families")
    ls.set_defaults(func=_list)

    for command in sub.choices.values():  # also after the command: tokenmerge bench --debug
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="as tokenmerge --debug"
        )
    return p


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command: 0 on success; a bad argument or input is one line on stderr and exit
    status 2 (returned, or a :class:`CLIError` where a bench module raised ``SystemExit(msg)``);
    ``--debug`` adds the traceback."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)

    def report(e: BaseException) -> str:
        if debug:
            traceback.print_exc()
        line = _one_line(e)
        print(f"tokenmerge: error: {line}", file=sys.stderr)
        return line

    try:
        if launched() and args.cmd != "bench":  # N copies would each write the same files
            raise SystemExit(
                f"`tokenmerge {args.cmd}` runs in one process; under torchrun or accelerate "
                "launch only `tokenmerge bench` (vision and LLM) shares its work among the ranks"
            )
        return args.func(args)
    except SystemExit as e:
        if isinstance(e, CLIError) or not isinstance(e.code, str):
            raise
        raise CLIError(report(e)) from None
    except ERRORS as e:
        report(e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
