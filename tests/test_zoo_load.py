"""`tm.zoo.load`: the public entry point to the offline zoo, hub names and local folders.

Everything here runs offline: local folders written by ``save_pretrained`` and
``timm.models.save_for_hf`` load through the same ``hf:``/``timm:`` names as the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

import tokenmerge as tm
from tokenmerge import zoo
from tokenmerge.cli.main import main
from tokenmerge.eval import zoo as loaders


def test_catalog_entries_are_complete() -> None:
    assert set(zoo.CATALOG) == set(loaders.ZOO)
    for name, m in zoo.CATALOG.items():
        assert m.name == name and m.kind in zoo.KINDS
        assert m.size_mb > 0 and m.licence and m.package and m.description
        line = zoo.describe(name)
        assert line.startswith(f"{name} ({m.kind}, {m.size_mb} MB") and m.licence in line


@pytest.mark.parametrize(
    "name, kind, options, error, message",
    [
        ("dinov3-xl", None, {}, KeyError, "unknown model 'dinov3-xl'; zoo names: dinov2-s, minilm"),
        ("hf:org/model", None, {}, ValueError, "one of vision, text, llm, audio, diffusion (got"),
        ("hf:org/model", "vlm", {}, ValueError, "needs kind= one of vision, text, llm, audio"),
        ("minilm", "vision", {}, ValueError, "'minilm' is a text model, not 'vision'"),
        ("timm:vit_small", "text", {}, ValueError, "timm models are vision models"),
        ("minilm", None, {"backend": "timm"}, TypeError, "text models take no options"),
    ],
)
def test_bad_names_are_refused_before_loading(name, kind, options, error, message) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        zoo.load(name, kind=kind, **options)


def test_list_shows_the_zoo_with_size_and_licence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in zoo.CATALOG:
        assert f"  {zoo.describe(name)}" in out
    # method descriptions are whole first paragraphs, not cut at a line break
    assert "Agglomerative Token Clustering (Haurum, Escalera, Taylor, Moeslund," in out
    assert "ECCV 2024, arXiv:2409.11923)." in out


@pytest.mark.real
def test_load_dinov2_returns_model_and_preprocess() -> None:
    model, preprocess = zoo.load("dinov2-s")
    assert isinstance(model, torch.nn.Module) and not model.training
    pixels = preprocess([np.zeros((60, 90, 3), np.uint8), np.full((224, 224, 3), 200, np.uint8)])
    assert pixels.shape == (2, 3, 224, 224)
    with torch.inference_mode(), tm.patched(model, tm.ToMe(r=16)):
        model(pixel_values=pixels)
        assert tm.state(model).tokens_per_layer[-1].tolist() == [257 - 12 * 16] * 2


def test_hf_local_folder_loads_offline(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=28, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.Dinov2Model(cfg).eval()
    ref.save_pretrained(tmp_path)
    proc = transformers.BitImageProcessor(size={"shortest_edge": 28}, crop_size=28)
    proc.save_pretrained(tmp_path)
    model, preprocess = zoo.load(f"hf:{tmp_path}", kind="vision")
    pixels = preprocess([np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)])
    assert pixels.shape == (1, 3, 28, 28)
    with torch.inference_mode():
        a = model(pixel_values=pixels).last_hidden_state
        b = ref(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_timm_local_folder_loads_offline(tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    args = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    save_for_hf(ref.eval(), str(tmp_path), model_args=args | {"num_classes": 0})
    model, preprocess = zoo.load(f"timm:{tmp_path}", kind="vision")
    pixels = preprocess([np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)])
    assert pixels.shape == (1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixels), ref(pixels), rtol=0, atol=0)
        tm.apply(model, tm.ToMe(r=4))
        out = model(pixels)  # the timm output is the pooled embedding
        assert out.shape == (1, 48) and tm.state(model).tokens_per_layer[-1].tolist() == [17 - 8]
        tm.remove(model)


@pytest.mark.real
def test_hf_local_text_folder_matches_the_zoo_name() -> None:
    folder = loaders.asset_path("minilm")
    model, tokenizer = zoo.load(f"hf:{folder}", kind="text")
    zmodel, ztok = zoo.load("minilm")
    batch = tokenizer(["token merging"], return_tensors="pt")
    assert (
        batch["input_ids"].tolist()
        == ztok(["token merging"], return_tensors="pt")["input_ids"].tolist()
    )
    with torch.inference_mode():
        torch.testing.assert_close(
            model(**batch).last_hidden_state, zmodel(**batch).last_hidden_state, rtol=0, atol=0
        )


@pytest.mark.real
def test_readme_quick_start_runs_as_written() -> None:
    """The README's first code block, executed offline as a new user would paste it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    with torch.inference_mode():
        exec(compile(block, "README.md (Quick start)", "exec"), scope)
    with pytest.raises(ValueError, match="not patched"):
        tm.patch_of(scope["model"])  # removed, and the scoped patch is gone too
    assert scope["pixels"].shape[1:] == (3, 224, 224)
    assert scope["out"].last_hidden_state.shape[1] == 257 - 12 * 16
    assert scope["dense"].shape[1] == 257 and scope["emb"].shape == (len(scope["images"]), 384)
