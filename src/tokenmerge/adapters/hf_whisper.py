"""Hugging Face Whisper: token merging in the audio encoder, with the decoder's cross-attention
told how many frames each merged token stands for.

Whisper's encoder always takes 30 s of audio: 3000 mel frames, two convolutions, 1500 tokens
with sinusoidal positions added before the first block. A 3-second clip is 90% silence and
padding, and every encoder layer and every decoder cross-attention pays for all 1500 tokens.

- **Encoder blocks** (``WhisperEncoderLayer``, pre-LN): every block-site method runs between
  self-attention and the MLP, exactly as in a ViT. Positions need no care (they are in the
  features from the start); there are no protected tokens and no padding at the input.
  Proportional attention (ToMe, eq. 1: ``softmax(q k^T / sqrt(d) + log s)``) is on by default.
  The fp16 clamp the layer applies to its output is kept (the spec returns whole sub-layer
  outputs, ``post_norm``), so budget 0 is bit-identical in every dtype.
- **Decoder cross-attention.** The encoder returns ``[B, N', C]`` merged tokens. Each decoder
  layer's ``encoder_attn`` gets, through its own ``attention_mask``, the bias
  ``log s_j`` for every key ``j`` (the same proportional attention: a merged token counts as
  the ``s_j`` frames it stands for) and ``-inf`` for padding, which dynamic methods (DToMe:
  a different number of tokens per clip) leave in a batch. With ``prop_attn=False`` only the
  padding is masked. ``generate`` reuses the cross-attention keys from its cache, and the bias
  is passed at every step; beam search's repeated encoder states get it repeated likewise.
  After every decoder call that needed the bias, a self-check verifies that each layer got
  it (:class:`~.base.ReductionNotApplied` otherwise).

Supported: ``WhisperForConditionalGeneration``, ``WhisperModel`` and ``WhisperEncoder`` alone
(its output is the merged tokens; ``tm.state(encoder)`` has their sizes), with ``sdpa`` or
``eager`` attention. Refused by name: audio classification (its head averages the encoder
tokens without sizes), the decoder-only classes, and other attention kernels. Word-level
timestamps (``return_token_timestamps``) read cross-attention weights per frame and are not
meaningful on merged frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.flops import CostModel
from .base import (
    ADAPTERS,
    Adapter,
    BlockSpec,
    ContextSlot,
    Target,
    UnsupportedModelError,
    check_blocks,
    class_names,
    not_applied,
)
from .patch import Patch

__all__ = ["HFWhisper", "cross_attention_bias"]

FAMILY = "hf-whisper"
_IMPLEMENTATIONS = ("sdpa", "eager")
_SUPPORTED = ("WhisperForConditionalGeneration", "WhisperModel", "WhisperEncoder")


def _clamped(m: nn.Module, h: Tensor) -> Tensor:
    """The encoder layer's overflow guard in float16 (``WhisperEncoderLayer.forward``)."""
    if h.dtype == torch.float16:
        limit = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-limit, max=limit)
    return h


# WhisperEncoderLayer: x + attn(LN(x)), then h + fc2(act(fc1(LN(h)))), clamped in fp16.
_SPEC = BlockSpec(
    attn=lambda m, x, mask: x + m.self_attn(m.self_attn_layer_norm(x), attention_mask=mask)[0],
    mlp=lambda m, h: _clamped(m, h + m.fc2(m.activation_fn(m.fc1(m.final_layer_norm(h))))),
    q=lambda m: m.self_attn.q_proj,
    k=lambda m: m.self_attn.k_proj,
    heads=lambda m: m.self_attn.num_heads,
    scale=lambda m: m.self_attn.scaling,
    post_norm=True,
)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The encoder and (if any) the decoder of a supported Whisper class."""
    cls = type(model).__name__
    if cls == "WhisperEncoder":
        return model, None
    if cls == "WhisperModel":
        return model.encoder, model.decoder
    if cls == "WhisperForConditionalGeneration":
        return model.model.encoder, model.model.decoder
    why = {
        "WhisperForAudioClassification": "its head averages the encoder tokens without their sizes",
        "WhisperForCausalLM": "it is Whisper's decoder alone (no audio tokens to merge)",
        "WhisperDecoder": "it is Whisper's decoder alone (no audio tokens to merge)",
    }.get(cls, "tokenmerge does not know what it reads from the encoder tokens")
    raise UnsupportedModelError(
        f"{FAMILY}: {cls} is not supported: {why}; supported: {', '.join(_SUPPORTED)}"
    )


def cross_attention_bias(patch: Patch, keys: Tensor) -> Tensor | None:
    """The additive cross-attention bias ``[B', 1, 1, N']`` over the encoder tokens ``keys``
    (``[B', N', C]``), from the latest encoder forward: ``log s_j`` (proportional attention),
    ``-inf`` for padding; ``None`` when nothing needs it (unreduced, dense, or sizes all 1
    without proportional attention).

    Raises:
        ValueError: ``keys`` come from another encoder forward (their batch or width do not
            match the latest one's).
    """
    st = patch.state
    if st is None or st.size is None:
        return None
    b, n = st.pos.shape
    if keys.shape[1] != n:
        if keys.shape[1] == st.n_orig:
            return None  # the full grid (dense call): every frame is its own token again
        raise ValueError(
            f"tokenmerge ({FAMILY}): the decoder got {keys.shape[1]} encoder tokens, but the "
            f"latest encoder forward of this patched model produced {n} (or {st.n_orig} "
            "unmerged); pass the encoder outputs of the latest call"
        )
    bias = st.attn_bias(patch.prop_attn, keys.dtype)
    if bias is None:
        return None
    if keys.shape[0] != b:
        if b == 0 or keys.shape[0] % b:
            raise ValueError(
                f"tokenmerge ({FAMILY}): the decoder got a batch of {keys.shape[0]} encoder "
                f"outputs, not a multiple of the latest encoder batch ({b})"
            )
        bias = bias.repeat_interleave(keys.shape[0] // b, 0)  # generate's expanded beams
    return bias


def _decoder_hooks(
    decoder: nn.Module,
) -> tuple[list[tuple[nn.Module, Callable[[Patch], Callable]]], list[tuple[nn.Module, Callable]]]:
    """Pre-hooks that give every cross-attention the size bias, and a post-hook on the decoder
    that checks each of them did."""
    layers = list(getattr(decoder, "layers", []))
    check_blocks(layers, "WhisperDecoderLayer", FAMILY)
    # per decoder call: the bias (computed once, from the encoder states it was given) and how
    # many cross-attentions received it; released with the patch (``Patch.slots``)
    slot = ContextSlot(f"tokenmerge_whisper_cross_{id(decoder)}")

    def start(patch: Patch) -> Callable:
        patch.slots.append(slot)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            keys = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            bias = cross_attention_bias(patch, keys) if isinstance(keys, Tensor) else None
            slot.set({"keys": keys, "bias": bias, "got": 0})

        return hook

    def cross(patch: Patch) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            keys = kwargs.get("key_value_states")
            if not isinstance(keys, Tensor):
                return None
            run = slot.get()
            if run is not None and run["keys"] is keys:
                bias = run["bias"]
                run["got"] += bias is not None
            else:  # called outside the decoder's forward
                bias = cross_attention_bias(patch, keys)
            if bias is None:
                return None
            mask = kwargs.get("attention_mask")
            return args, {**kwargs, "attention_mask": bias if mask is None else mask + bias}

        return hook

    def check(patch: Patch) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            run = slot.get()
            slot.set(None)
            if run is None or run["bias"] is None or run["got"] == len(layers):
                return
            raise not_applied(
                "block",
                patch.method,
                f"{run['got']} of the decoder's {len(layers)} cross-attentions got the merged "
                "tokens' sizes (a framework change bypasses WhisperDecoderLayer.encoder_attn)",
            )

        return hook

    pre = [(decoder, start)] + [(layer.encoder_attn, cross) for layer in layers]
    return pre, [(decoder, check)]


class HFWhisper(Adapter):
    """Whisper's audio encoder, with size-aware decoder cross-attention (module docstring)."""

    family = FAMILY
    description = (
        "transformers Whisper: WhisperForConditionalGeneration (generate included), "
        "WhisperModel, WhisperEncoder; merging in the encoder blocks, size bias in the "
        "decoder's cross-attention (sdpa/eager)"
    )

    def matches(self, model: nn.Module) -> bool:
        return "WhisperPreTrainedModel" in class_names(model)

    def target(self, model: nn.Module) -> Target:
        encoder, decoder = _parts(model)
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in _IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"{FAMILY}: attention implementation {impl!r} is not supported (it cannot take "
                f"the size bias as a float mask); load the model with attn_implementation in "
                f"{_IMPLEMENTATIONS}"
            )
        blocks = list(getattr(encoder, "layers", []))
        if not blocks:
            raise UnsupportedModelError(f"{FAMILY}: no WhisperEncoderLayer list in the encoder")
        check_blocks(blocks, "WhisperEncoderLayer", FAMILY)
        cfg = encoder.config
        pre, post = _decoder_hooks(decoder) if decoder is not None else ([], [])
        return Target(
            family=FAMILY,
            blocks=blocks,
            spec=_SPEC,
            cost=CostModel(depth=len(blocks), dim=cfg.d_model, mlp_dim=cfg.encoder_ffn_dim),
            n_prefix=0,
            prop_attn=True,
            entry=encoder,
            pre_hooks=pre,
            post_hooks=post,
        )


ADAPTERS.append(HFWhisper())
