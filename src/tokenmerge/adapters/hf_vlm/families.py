"""Which vision-language models the hf-vlm adapter knows, and where their parts are."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..base import UnsupportedModelError, class_names
from ..hf_decoder.adapter import SUPPORTED as DECODERS

#: VLM class -> how its visual tokens are laid out in the LLM's input
#: ("grid": one square grid per image, LLaVA-1.5; "anyres": LLaVA-NeXT/OneVision's base image
#: plus unpadded tiles with a newline token ending every row; "mrope": Qwen2-VL's merged
#: patches, ``t x h/m x w/m`` per image from ``image_grid_thw``, with 3-D M-RoPE positions)
VLMS: dict[str, str] = {
    "LlavaForConditionalGeneration": "grid",
    "LlavaNextForConditionalGeneration": "anyres",
    "LlavaOnevisionForConditionalGeneration": "anyres",
    "Qwen2VLForConditionalGeneration": "mrope",
    "Qwen2_5_VLForConditionalGeneration": "mrope",
}

#: language models with their own decoder classes (Qwen2-VL's M-RoPE text models)
_TEXT: dict[str, tuple[str, str]] = {
    "Qwen2VLTextModel": ("Qwen2VLDecoderLayer", "Qwen2VLAttention"),
    "Qwen2_5_VLTextModel": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLAttention"),
}


@dataclass(frozen=True)
class VLMParts:
    """Where a supported VLM keeps what the adapter needs.

    Attributes:
        layout: ``"grid"``, ``"anyres"`` or ``"mrope"`` (see :data:`VLMS`).
        base: the ``...Model`` inside the ``...ForConditionalGeneration``.
        language_model: the decoder LLM the visual tokens are fed to.
        layer_cls, attn_cls: its decoder layer and attention classes.
        vision_tower: the vision encoder.
        image_token_id: the placeholder id of a visual token in ``input_ids``.
        video_token_id: the placeholder id of a video's visual token (LLaVA-OneVision,
            Qwen2-VL), or ``None`` for classes without video input (LLaVA, LLaVA-NeXT: there
            a clip is its frames given as images, back to back).
        cls_token: the vision tower prepends a CLS token (CLIP, DINOv2; not SigLIP), which
            ``vision_feature_select_strategy="full"`` passes on as a visual token.
    """

    layout: str
    base: nn.Module
    language_model: nn.Module
    layer_cls: str
    attn_cls: str
    vision_tower: nn.Module
    image_token_id: int
    cls_token: bool
    video_token_id: int | None = None


def parts_of(model: nn.Module) -> VLMParts:
    """The parts of a supported VLM; anything unexpected is refused by name."""
    name = type(model).__name__
    if name not in VLMS:
        raise UnsupportedModelError(
            f"{name} is not a vision-language model the hf-vlm adapter knows; supported: "
            f"{', '.join(sorted(VLMS))}"
        )
    base = getattr(model, "model", None)
    lm = getattr(base, "language_model", None)
    tower = getattr(base, "vision_tower", None) or getattr(base, "visual", None)
    if lm is None or tower is None:
        raise UnsupportedModelError(
            f"{name}: expected .model.language_model and .model.vision_tower (or .visual); this "
            "transformers version lays the model out differently"
        )
    lm_name = type(lm).__name__
    if lm_name in _TEXT:
        layer_cls, attn_cls = _TEXT[lm_name]
    elif lm_name in DECODERS:
        layer_cls, attn_cls = DECODERS[lm_name]
    else:
        known = sorted({*_TEXT, *(n for n in DECODERS if not n.endswith("ForCausalLM"))})
        raise UnsupportedModelError(
            f"{name}: its language model is a {lm_name}; the hf-vlm adapter knows "
            f"{', '.join(known)}"
        )
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        raise UnsupportedModelError(f"{name}: its config names no image_token_id")
    cls_token = not any(c.startswith("Siglip") for c in class_names(tower))
    video = getattr(model.config, "video_token_id", None)
    if video is None:
        video = getattr(model.config, "video_token_index", None)
    video = None if video is None else int(video)
    return VLMParts(VLMS[name], base, lm, layer_cls, attn_cls, tower, int(token), cls_token, video)
