"""The CLI refuses bad arguments before any model loads: one line on stderr, exit status 2,
the traceback only with --debug; every option has help; the few-token warning; visualize's
letterbox and caption."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from tokenmerge.cli.main import build_parser, main
from tokenmerge.methods import REGISTRY
from tokenmerge.zoo import CATALOG

LOADERS = (
    "load_vision",
    "load_text",
    "load_sentence_transformer",
    "load_causal_lm",
    "load_saliency_decoder",
)
HUB = "hf:NAME / timm:NAME (a hub id) or hf:PATH / timm:PATH (a local folder)"
REGISTERED = ", ".join(sorted(REGISTRY))


class Loaded(AssertionError):
    """A model loader was called: the argument was checked too late."""


@pytest.fixture
def no_models(monkeypatch):
    """Every zoo loader raises :class:`Loaded`."""
    from tokenmerge.eval import zoo

    def refuse(*args, **kwargs):
        raise Loaded(f"a model was loaded: {args}")

    for name in LOADERS:
        monkeypatch.setattr(zoo, name, refuse)


@pytest.fixture
def image(tmp_path):
    """A small non-square PNG."""
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (60, 30), (200, 30, 30)).save(path)
    return path


def error(argv, capsys) -> str:
    """The one line ``main(argv)`` wrote on stderr, checking that it exited with status 2."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def zoo_names() -> str:
    return ", ".join(f"{n} ({m.kind})" for n, m in CATALOG.items())


@pytest.mark.parametrize(
    "argv, message",
    [
        # model names
        (
            ["bench", "--model", "nosuchmodel"],
            "unknown model 'nosuchmodel'; zoo names: {zoo}; also accepted: {hub}",
        ),
        (
            ["visualize", "{image}", "--model", "nosuchmodel"],
            "unknown model 'nosuchmodel'; zoo names: {zoo}; also accepted: {hub}",
        ),
        (
            ["tune", "--flops", "0.5", "--model", "vit"],
            "unknown model 'vit'; zoo names: {zoo}; also accepted: {hub}",
        ),
        (
            ["bench-compile", "--model", "vit"],
            "unknown model 'vit'; zoo names: {zoo}; also accepted: {hub}",
        ),
        (
            ["bench", "--model", "hf:facebook/dinov2-small"],
            "--model 'hf:facebook/dinov2-small' is a hub model: pass --kind vision, text, llm, "
            "audio or diffusion",
        ),
        (
            ["bench", "--model", "hf:", "--kind", "text"],
            "--model 'hf:': give a hub id or a folder after hf:",
        ),
        (
            ["bench", "--model", "timm:vit_small", "--kind", "text"],
            "--model 'timm:vit_small': timm models are vision models, not text",
        ),
        (
            ["bench", "--model", "minilm", "--kind", "vision"],
            "--model 'minilm' is a text model; bench needs a vision model",
        ),
        (
            ["visualize", "{image}", "--model", "minilm"],
            "--model 'minilm' is a text model; visualize needs a vision model",
        ),
        (
            ["bench-profile", "--model", "smollm2-135m"],
            "--model 'smollm2-135m' is a llm model; bench-profile needs a vision model",
        ),
        # image files
        (["visualize", "{tmp}/nope.png"], "'{tmp}/nope.png': no such file"),
        (["visualize", "{tmp}"], "'{tmp}': no such file (a folder)"),
        (
            ["visualize", "{tmp}/text.png"],
            "'{tmp}/text.png' is not an image PIL can read (UnidentifiedImageError)",
        ),
        (
            ["visualize", "{image}", "--out", "{tmp}/no/v.png"],
            "--out '{tmp}/no/v.png': no folder '{tmp}/no'",
        ),
        # method names
        (
            ["bench", "--methods", "tome,nope"],
            "--methods: unknown method 'nope'; registered: {reg}",
        ),
        (
            ["visualize", "{image}", "--method", "nope"],
            "--method: unknown method 'nope'; registered: {reg}",
        ),
        (
            ["bench-compile", "--method", "nope"],
            "--method: unknown method 'nope'; registered: {reg}",
        ),
        (
            ["tune", "--flops", "0.5", "--methods", "nope"],
            "--methods: unknown method 'nope'; registered: {reg}",
        ),
        (
            ["bench", "--model", "minilm", "--methods", "nope"],
            "--methods: unknown method 'nope'; registered: {reg}",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--methods", "nope"],
            "--methods: unknown method 'nope'; registered: {reg}",
        ),
        # method parameters
        (
            ["bench", "--param", "tome.ratio=0.5"],
            "--param tome.ratio=0.5: tome has no parameter 'ratio'; accepted: {tome}",
        ),
        (
            ["bench", "--model", "minilm", "--param", "tome.ratio=0.5"],
            "--param tome.ratio=0.5: tome has no parameter 'ratio'; accepted: {tome}",
        ),
        (
            ["bench", "--param", "tome.r=8"],
            "--param tome.r=8: tome's 'r' is its budget; set it with --budgets (or "
            "--budgets-for tome=...)",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--param", "snapkv.ratio=0.5"],
            "--param snapkv.ratio=0.5: snapkv's 'ratio' is its budget; set it with --budgets "
            "(or --budgets-for snapkv=...)",
        ),
        (
            ["bench", "--param", "nope.r=2"],
            "--param nope.r=2: unknown method 'nope'; registered: {reg}",
        ),
        (["bench", "--param", "tome"], "--param expects METHOD.NAME=VALUE, got 'tome'"),
        (
            ["bench", "--param", "tome.prop_attn=maybe"],
            "--param tome.*: ToMe.prop_attn must be True or False (a Python or NumPy bool, or a "
            "0-d bool tensor) or None, got 'maybe' (a str)",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--param", "snapkv.window=-1"],
            "--param snapkv.*: window must be >= 1 and kernel a positive odd number, got "
            "window=-1, kernel=5",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--param", "bench.nope=1"],
            "--param bench.nope=1: bench has no parameter 'nope'; accepted: {settings}",
        ),
        # budgets
        (
            ["bench", "--budgets", "8,x"],
            "cannot parse budget 'x' (invalid literal for int() with base 10: 'x'); accepted "
            "forms: 16, 16:-1, list:8/8/16, keep:0.9, tokens:64, flops:0.5",
        ),
        (
            ["visualize", "{image}", "--budget", "x"],
            "cannot parse budget 'x' (invalid literal for int() with base 10: 'x'); accepted "
            "forms: 16, 16:-1, list:8/8/16, keep:0.9, tokens:64, flops:0.5",
        ),
        (
            ["bench-profile", "--budgets", "x"],
            "cannot parse budget 'x' (invalid literal for int() with base 10: 'x'); accepted "
            "forms: 16, 16:-1, list:8/8/16, keep:0.9, tokens:64, flops:0.5",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--budgets", "2,x"],
            "--budgets for LLMs are compression factors like 2,4,8; got 'x'",
        ),
        (
            ["bench-compile", "--budgets", "8,200"],
            "tome r=200 on dinov2-s: r=200 is too large: the first layer has 257 tokens (1 "
            "protected) and this method can remove at most 128 of them per layer; choose a "
            "value in [0, 128]",
        ),
        (
            ["bench", "--budgets", "list:8/8"],
            "tome r=8/8 on dinov2-s: the per-layer schedule r=[8, 8] has 2 values but the model "
            "has 12 patched layers; give one value per layer (12 values), or a constant r",
        ),
        # tasks and data sets
        (
            ["bench", "--tasks", "cosine,nope"],
            "unknown tasks ['nope']; accepted: ['cosine', 'knn', 'probe', 'saliency', 'speed']",
        ),
        (
            ["bench", "--model", "minilm", "--tasks", "nope"],
            "unknown tasks ['nope']; accepted: ['cosine', 'probe', 'retrieval', 'speed']",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--tasks", "nope"],
            "unknown tasks ['nope']; accepted: ['memory', 'needle', 'ppl', 'speed']",
        ),
        (
            ["bench", "--dataset", "photos,imagenet"],
            "unknown datasets ['imagenet']; accepted: textiles, photos, fashion-mnist",
        ),
        (
            ["bench", "--model", "minilm", "--dataset", "imagenet"],
            "unknown data sets ['imagenet']; accepted: tweets, reviews, docs",
        ),
        (
            ["bench", "--model", "smollm2-135m", "--dataset", "austen,nope"],
            "unknown corpora ['nope']; accepted: austen, mobydick, jargon, pydocs",
        ),
        (
            ["bench-profile", "--dataset", "imagenet"],
            "unknown datasets ['imagenet']; accepted: textiles, photos, fashion-mnist",
        ),
        (
            ["tune", "--flops", "0.5", "--images", "{tmp}/nope"],
            "--images '{tmp}/nope' is neither a dataset (textiles, photos, fashion-mnist) nor "
            "a folder",
        ),
        (
            ["bench", "--full", "--quick"],
            "--full and --quick exclude each other",
        ),
    ],
)
def test_bad_argument_is_one_line_before_loading(argv, message, no_models, tmp_path, image, capsys):
    from tokenmerge.cli.checks import method_fields
    from tokenmerge.eval.llm.cli import SETTINGS

    (tmp_path / "text.png").write_text("not an image")
    values = {
        "zoo": zoo_names(),
        "hub": HUB,
        "reg": REGISTERED,
        "tome": ", ".join(method_fields("tome")),
        "settings": ", ".join(SETTINGS),
        "tmp": str(tmp_path),
        "image": str(image),
    }
    argv = [a.format(**values) for a in argv]
    assert error(argv, capsys) == "tokenmerge: error: " + message.format(**values)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["bench", "--n", "0"],
            "tokenmerge bench: error: argument --n/--samples: expected at least 1, got 0",
        ),
        (
            ["bench-compile", "--rounds", "x"],
            "tokenmerge bench-compile: error: argument --rounds: expected a whole number, got 'x'",
        ),
        (
            ["visualize", "a.png", "--backend", "jax"],
            "tokenmerge visualize: error: argument --backend: invalid choice: 'jax' (choose "
            "from ",  # the list's quoting differs between Python versions
        ),
    ],
)
def test_argparse_errors_are_one_line(argv, message, no_models, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    prog = message.split(": error")[0]
    assert "\n" not in err and err.endswith(f" (see {prog} --help)")
    assert err.startswith(message) if message.endswith(" ") else err.startswith(f"{message} (see")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, no_models, capsys):
    argv = ["bench", "--model", "nosuchmodel"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "in check_model" in err  # where it was raised
    last = err.strip().splitlines()[-1]
    assert last.startswith("tokenmerge: error: unknown model 'nosuchmodel'")


def test_debug_shows_the_traceback_of_a_bench_module_exit(no_models, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--debug", "bench", "--budgets-for", "nope=4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "parse_method_budgets" in err
    assert err.strip().splitlines()[-1].startswith("tokenmerge: error: --budgets-for expects")


def test_without_debug_no_traceback(no_models, capsys):
    error(["bench", "--budgets-for", "nope=4"], capsys)  # one line, checked there


class _Stop(Exception):
    """Raised by a stand-in for the bench's run."""


def test_few_tokens_warning_before_the_model_loads(monkeypatch, tmp_path, capsys):
    from tokenmerge.eval.vision import cli as vision_cli

    def stop(cfg, *args):
        raise _Stop

    monkeypatch.setattr(vision_cli, "run", stop)
    with pytest.raises(_Stop):
        argv = ["bench", "--methods", "tome,pitome", "--budgets", "16,keep:0.5"]
        main([*argv, "--budgets-for", "pitome=20,tokens:4", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tokenmerge: warning: tome keep=0.5 leaves 2 of dinov2-s's 257 tokens (fewer than 8 "
        "from layer 6 on): too few for a reliable output",
        "tokenmerge: warning: pitome tokens=4 leaves 4 of dinov2-s's 257 tokens (fewer than "
        "8 from layer 11 on): too few for a reliable output",
    ]


def test_few_tokens_warning_in_visualize_and_compile(no_models, image, capsys, monkeypatch):
    with pytest.raises(Loaded):
        main(["visualize", str(image), "--budget", "keep:0.5"])
    assert capsys.readouterr().err.strip() == (
        "tokenmerge: warning: tome keep=0.5 leaves 2 of dinov2-s's 257 tokens (fewer than 8 "
        "from layer 6 on): too few for a reliable output"
    )
    with pytest.raises(Loaded):
        main(["bench-compile", "--budgets", "8,20"])
    assert capsys.readouterr().err == ""  # r=20 leaves 17


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    assert "``" not in parser.description and ":mod:" not in parser.description
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) >= {"bench", "visualize", "bench-compile", "bench-profile", "tune"}
    for name, command in sub.choices.items():
        if name == "list":  # the lead's; it has no options
            continue
        assert command.description, name
        text = command.format_help()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (name, action.dest)
            shown = command.formatter_class("x")._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, (name, action.dest)
            assert " ".join(shown.split()[:2]).split("%")[0] in " ".join(text.split()), name
    # the outputs go to a git-ignored folder unless --out says otherwise
    for name in ("bench", "bench-compile", "bench-profile"):
        assert sub.choices[name].parse_args([]).out == "tokenmerge-results"
    assert sub.choices["tune"].parse_args(["--flops", "0.5"]).out == "tokenmerge-results/plan.json"


def test_letterbox_geometry():
    from PIL import Image

    from tokenmerge.eval.visualize import letterbox, letterbox_box

    assert letterbox_box(300, 150, 224) == (0, 56, 224, 112)
    assert letterbox_box(150, 300, 224) == (56, 0, 112, 224)
    assert letterbox_box(224, 224, 224) == (0, 0, 224, 224)
    assert letterbox_box(1000, 1, 224) == (0, 111, 224, 1)
    square, box = letterbox(Image.new("RGB", (300, 150), (250, 0, 0)), 224)
    arr = np.asarray(square)
    assert square.size == (224, 224) and box == (0, 56, 224, 112)
    assert (arr[:56] == 0).all() and (arr[168:] == 0).all()  # black bars, nothing cropped
    assert (arr[60:164, :, 0] > 200).all()  # the whole width of the image is there


def test_caption_strip():
    from tokenmerge.eval.visualize import captioned

    img = np.full((32, 64, 3), 100, np.uint8)
    out = captioned(img, "tome r=16 on dinov2-s: 257 -> 65 tokens after 12 layers")
    assert out.shape[1] == 64 and out.shape[0] > 32
    assert (out[:32] == img).all()
    strip = out[32:]
    assert (strip < 80).any() and (strip == 255).any()  # black text on white


def test_visualize_end_to_end_on_a_tiny_model(monkeypatch, tmp_path, image, capsys):
    """A tiny random ViT (5 layers, 8x8 patches) as a hub model: letterboxed input, caption,
    and the few-token warning read after the forward."""
    from models import _hf
    from PIL import Image

    from tokenmerge.eval import zoo

    model = _hf("ViTModel", "ViTConfig", "sdpa", num_hidden_layers=5).eval()
    vm = zoo.VisionModel("hf:tiny", model, 32, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, "hf", 4)
    monkeypatch.setattr(zoo, "load_vision", lambda name, backend="hf": vm)
    out = tmp_path / "v.png"
    assert main(["visualize", str(image), "--model", "hf:tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "tokenmerge: warning: tome r=16 leaves 5 of hf:tiny's 65 tokens (fewer than 8 from "
        "layer 5 on): too few for a reliable output"
    )
    assert captured.out.strip() == (
        f"wrote {out} (tome r=16 on hf:tiny (letterboxed): 65 -> 5 tokens after 5 layers)"
    )
    png = np.asarray(Image.open(out))
    assert png.shape[1] == 64 and png.shape[0] > 32  # image | overlay, caption below
    assert (png[:8, :32] == 0).all() and (png[24:32, :32] == 0).all()  # the letterbox bars
