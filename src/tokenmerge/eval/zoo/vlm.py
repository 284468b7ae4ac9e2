"""``tiny-llava``: the zoo's DINOv2-S and SmolLM2-135M-Instruct joined by a trained 2-layer MLP
projector, as a stock transformers ``LlavaForConditionalGeneration``.

The encoder and the LLM keep their zoo weights; only the projector (384 -> 576 -> 576, GELU;
float32, 2.2 MB) was trained, on the synthetic scenes of :mod:`tokenmerge.eval.vlm.scenes`,
by ``scripts/train_tiny_llava.py`` (720 CPU steps). It is a measuring instrument for token
reduction in VLMs (256 image tokens per 224-px image), not a useful assistant. Held-out, it
answers colour, shape and count questions at 2.2-2.75x chance; relative position and the
clothing class it has not learnt (at chance), so for those only agreement with the unreduced
model means anything.

Image features: ``vision_feature_layer=-1`` with the ``default`` strategy, i.e. DINOv2's last
block output *before* its final layernorm (transformers' ``hidden_states[-1]``), CLS dropped.
The stock class cannot apply the vision tower's layernorm, so the projector learnt to read the
raw features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..vlm.prompt import IMAGE_TOKEN, N_IMAGE_TOKENS, TinyLlavaInputs
from .lm import load_causal_lm
from .sources import _require, verify_sha256
from .vision import load_vision

__all__ = [
    "PROJECTOR_FILE",
    "PROJECTOR_SHA256",
    "VIDEO_PROJECTOR_FILE",
    "VIDEO_PROJECTOR_SHA256",
    "build_tiny_llava",
    "forward_from_features",
    "image_features",
    "load_projector",
    "load_tiny_llava",
]

PROJECTOR_FILE = Path(__file__).parent / "assets" / "tiny_llava_projector.safetensors"
PROJECTOR_SHA256 = "f297749dd9b147bf9b9741e315798dba9d674f9abb82923fd14e02757d8e5bc4"
#: ``tiny-llava-video``: the same projector trained on, from there, on synthetic clips
VIDEO_PROJECTOR_FILE = PROJECTOR_FILE.with_name("tiny_llava_video_projector.safetensors")
VIDEO_PROJECTOR_SHA256 = "d8346f6dc97dfa8c99bb1c3dace92c86aef8a59d8371035edee8303a4825a9d4"
VISION_FEATURE_LAYER = -1


def build_tiny_llava(
    projector: dict[str, torch.Tensor] | None = None,
    vision_feature_layer: int = VISION_FEATURE_LAYER,
) -> tuple[nn.Module, TinyLlavaInputs]:
    """The Llava model from the zoo's encoder and LLM, with `projector` weights
    (``linear_1.weight``, ...; a seeded random init if None: what training starts from).
    Float32, eval mode, SDPA attention."""
    transformers = _require("transformers")
    vm = load_vision("dinov2-s")
    lm, tokenizer = load_causal_lm("smollm2-135m")
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config = transformers.LlavaConfig(
        vision_config=vm.model.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=image_id,
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",  # drop CLS: 16x16 = 256 image tokens
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    with torch.device("meta"):  # every weight is overwritten below
        model = transformers.LlavaForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    model = model.to_empty(device="cpu")
    inner = model.model
    _copy(inner.vision_tower, vm.model)
    _copy(inner.language_model, lm.model)
    _copy(model.lm_head, lm.lm_head)
    if projector is None:
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(0)
            for layer in (
                inner.multi_modal_projector.linear_1,
                inner.multi_modal_projector.linear_2,
            ):
                layer.reset_parameters()
    else:
        _copy(inner.multi_modal_projector, projector)
    if config.tie_word_embeddings:
        model.lm_head.weight = inner.language_model.embed_tokens.weight
    # the zoo runs DINOv2-S at 224 px (16 x 16 patches); its config keeps the 518 px it was
    # trained at, and the position table (sized from that) is interpolated by the model
    model.config.vision_config.image_size = 224
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return model, TinyLlavaInputs(tokenizer, vm.preprocess)


def _copy(module: nn.Module, source: nn.Module | dict[str, torch.Tensor]) -> None:
    """Load every parameter and buffer of `module` (built on the meta device) from a module of
    the same architecture, or from a state dict."""
    weights = source if isinstance(source, dict) else source.state_dict()
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if isinstance(source, nn.Module):
        # Non-persistent buffers (rotary frequencies) are not in a state dict: copy them too.
        own = dict(module.named_buffers())
        for name, buf in source.named_buffers():
            if name not in weights:
                own[name].copy_(buf)
    if missing or unexpected:
        raise RuntimeError(f"tiny-llava weights: missing={missing}, unexpected={unexpected}")


def load_projector(path: str | Path = PROJECTOR_FILE, sha256: str | None = PROJECTOR_SHA256):
    """The projector weights (float32), checked against the pinned sha256 unless `sha256` is
    None (a freshly trained file)."""
    _require("safetensors")
    from safetensors.torch import load_file

    if sha256 is not None:
        verify_sha256(path, sha256)
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_tiny_llava(video: bool = False) -> tuple[nn.Module, Any]:
    """``tiny-llava`` and its input builder (:class:`~tokenmerge.eval.vlm.prompt.TinyLlavaInputs`);
    ``video=True``: ``tiny-llava-video``, whose projector went on to learn the synthetic clips'
    questions (``inputs.clips(clips, questions)``).

    >>> model, inputs = load_tiny_llava()
    >>> batch = inputs.batch([image], ["What shape is the red object?"])
    >>> inputs.answers(model.generate(**batch, max_new_tokens=4, do_sample=False), batch)
    ['circle']
    """
    if video:
        return build_tiny_llava(load_projector(VIDEO_PROJECTOR_FILE, VIDEO_PROJECTOR_SHA256))
    return build_tiny_llava(load_projector())


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen encoder's output that the projector reads, ``[B, 256, 384]``: the chosen
    hidden state with CLS dropped, exactly what ``LlavaModel.get_image_features`` selects."""
    layer = model.config.vision_feature_layer
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[layer][:, 1:]


def forward_from_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    features: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Llava's forward from precomputed `features` (:func:`image_features`): project them,
    scatter them into the text embeddings at the image tokens, run the language model, and
    return the logits at `positions` (a ``[B, L]`` bool mask; all positions if None).

    The same computation as ``model(input_ids, pixel_values, attention_mask).logits``, minus the
    encoder; training uses it to skip the frozen encoder and the 49152-row LM head at the
    positions that carry no loss."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    projected = inner.multi_modal_projector(features.to(embeds.dtype))
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state
    return model.lm_head(hidden if positions is None else hidden[positions])
