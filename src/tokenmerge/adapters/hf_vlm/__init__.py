"""Hugging Face vision-language models: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and
Qwen2.5-VL, on stock ``transformers`` classes with no copied forward.

Sites (see :mod:`.runtime` for how each is hooked in):

=========  ==========================================================  ======================
site       what is reduced                                              positions
=========  ==========================================================  ======================
projector  each image's visual tokens, once, before the first LLM       original position of
           layer (VisionZip, M3 pooling, AIM merging, DART, DivPrune,   each output's
           Recoverable Compression, random, downsampling)               representative
decoder    the image tokens of the hidden states at layer K (FastV,     original positions
           AIM's progressive pruning, HoliTom's inner merge)
kv         the KV cache after the prefill (any KV method)               original positions
=========  ==========================================================  ======================

Positions are never re-indexed: Qwen2-VL's 3-D M-RoPE positions of a kept token are its
own, and text after an image keeps its positions. ``generate`` decodes on the reduced cache.
Batches may mix images of different sizes (LLaVA-NeXT tiles, Qwen2-VL resolutions): every
image is reduced on its own, and samples that keep different numbers of tokens are left-padded.
"""

from .adapter import VLMAdapter
from .families import VLMS, VLMParts, parts_of

__all__ = ["VLMS", "VLMAdapter", "VLMParts", "parts_of"]
