"""Tiny random vision-language models of every class the hf-vlm adapter supports, with
batched inputs that mix image sizes (so images have different token counts).

``make(name)`` returns ``(model, inputs)``; ``inputs`` holds ``input_ids``,
``attention_mask`` (left padding) and the class's pixel arguments, usable for a forward and
for ``generate``. ``inputs_for(name, model, which)`` builds the inputs of a sub-batch
(``which``: sample indices), exactly as the same samples are built in the full batch.
``video_inputs_for`` does the same with one video clip per sample (clips of different
lengths, except for LLaVA-OneVision, whose video tensor gives every clip the same frames).
"""

from __future__ import annotations

import warnings

import torch

VLM_NAMES = ("llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl")
#: the classes with video input (LLaVA: a clip is its frames given as images, back to back)
VIDEO_NAMES = ("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl")
IMG = 32  # vision tower input side (patch 8 -> 4x4 = 16 tokens per tile)
IMAGE, VIDEO, VSTART, VEND, PAD = 99, 96, 97, 98, 0
_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
)
_CLIP = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMG,
    patch_size=8,
)
#: per sample: (prompt before the image, image size (h, w), prompt after the image)
_SAMPLES = [
    ([1, 5], (32, 32), [7, 8, 9]),
    ([1], (64, 32), [7, 9]),
    ([1, 6, 6], (32, 64), [8]),
]


def _quiet(cls, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls._from_config(cfg, attn_implementation="sdpa").eval()


def _build(name: str):
    import transformers as t

    if name == "llava":
        cfg = t.LlavaConfig(
            vision_config=t.CLIPVisionConfig(**_CLIP),
            text_config=t.LlamaConfig(**_TEXT),
            image_token_id=IMAGE,
            vision_feature_layer=-2,
        )
        return _quiet(t.LlavaForConditionalGeneration, cfg)
    if name in ("llava-next", "llava-onevision"):
        # (VLM, tower, LLM) prefixes: NeXT with CLIP and Llama, OneVision with SigLIP and Qwen2
        vlm, tower, llm = {
            "llava-next": ("LlavaNext", "CLIPVision", "Llama"),
            "llava-onevision": ("LlavaOnevision", "SiglipVision", "Qwen2"),
        }[name]
        cfg = getattr(t, f"{vlm}Config")(
            vision_config=getattr(t, f"{tower}Config")(**_CLIP),
            text_config=getattr(t, f"{llm}Config")(**_TEXT),
            image_token_id=IMAGE,
            vision_feature_layer=-1,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
            **({"video_token_id": VIDEO} if name == "llava-onevision" else {}),
        )
        return _quiet(getattr(t, f"{vlm}ForConditionalGeneration"), cfg)
    prefix = {"qwen2-vl": "Qwen2VL", "qwen2.5-vl": "Qwen2_5_VL"}[name]
    vis = dict(
        depth=2,
        embed_dim=32,
        hidden_size=32,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_chans=3,
        in_channels=3,
        mlp_ratio=2,
        intermediate_size=64,
        out_hidden_size=32,
        fullatt_block_indexes=[1],
        window_size=16,
    )
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    cfg = getattr(t, f"{prefix}Config")(
        vision_config=vis,
        text_config=dict(_TEXT, rope_parameters=rope),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    return _quiet(getattr(t, f"{prefix}ForConditionalGeneration"), cfg)


def _pixels(name: str, model, which: list[int], seed: int) -> tuple[dict, list[int]]:
    """Pixel arguments for the samples ``which`` and each image's token count."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(len(_SAMPLES)):  # drawn for every sample, so sub-batches get the same pixels
        h, w = _SAMPLES[i][1]
        images.append(torch.randn(3, h, w, generator=g))
    chosen = [images[i] for i in which]
    sizes = [tuple(_SAMPLES[i][1]) for i in which]
    if name == "llava":
        px = torch.stack([im[:, :IMG, :IMG] for im in chosen])
        return {"pixel_values": px}, [16] * len(which)
    if name in ("llava-next", "llava-onevision"):
        # tiles: the base image (resized) first, then the crops of the best pinpoint
        tiles = []
        for im in chosen:
            base = torch.nn.functional.interpolate(im[None], size=(IMG, IMG), mode="bilinear")
            # a 32-px image's base would equal its one tile: exact duplicate tokens make the
            # similarity methods' ties flip on float noise; real bases are resized photos
            base = base.flip(-1)
            crops = [
                im[:, r : r + IMG, c : c + IMG]
                for r in range(0, im.shape[1], IMG)
                for c in range(0, im.shape[2], IMG)
            ]
            tiles.append(torch.cat([base, torch.stack(crops)]))
        most = max(t.shape[0] for t in tiles)
        px = torch.stack(
            [torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for t in tiles]
        )
        image_sizes = torch.tensor(sizes)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=px, image_sizes=image_sizes)
        counts = [int(f.shape[0]) for f in feats.pooler_output]
        return {"pixel_values": px, "image_sizes": image_sizes}, counts
    # Qwen2-VL: flattened patches (temporal 2 x 3 channels x 4 x 4) of an h/4 x w/4 grid
    thw = torch.tensor([[1, h // 4, w // 4] for h, w in sizes])
    # patches of sample i must not depend on the batch: drawn per sample
    parts = []
    for i, (h, w) in zip(which, sizes, strict=True):
        gi = torch.Generator().manual_seed(seed + 10 + i)
        parts.append(torch.randn((h // 4) * (w // 4), 3 * 2 * 4 * 4, generator=gi))
    px = torch.cat(parts)
    counts = [int(t_ * h_ * w_) // 4 for t_, h_, w_ in thw.tolist()]
    return {"pixel_values": px, "image_grid_thw": thw}, counts


def inputs_for(name: str, model, which: list[int], seed: int = 0) -> dict:
    """Inputs of the samples ``which`` (left-padded to the longest)."""
    pixels, counts = _pixels(name, model, which, seed)
    qwen = name.startswith("qwen")
    seqs = []
    for i, n in zip(which, counts, strict=True):
        before, _, after = _SAMPLES[i]
        img = [VSTART, *[IMAGE] * n, VEND] if qwen else [IMAGE] * n
        seqs.append(before + img + after)
    length = max(len(s) for s in seqs)
    ids = torch.tensor([[PAD] * (length - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs])
    out = {"input_ids": ids, "attention_mask": mask, **pixels}
    if qwen:
        out["mm_token_type_ids"] = (ids == IMAGE).long()
    return out


#: per sample: (prompt before the clip, its frames, prompt after it)
_CLIPS = [([1, 5], 2, [7, 8]), ([1], 3, [9]), ([1, 6, 6], 2, [8])]
QWEN_VIDEO = 16  # Qwen2-VL video frames: 16 x 16 px -> 4 x 4 patches -> 2 x 2 merged tokens


def clip_frames(name: str, i: int) -> int:
    """Frames of sample ``i``'s clip (Qwen2-VL: temporal patches of 2 frames each)."""
    return 2 if name == "llava-onevision" else _CLIPS[i][1]


def video_inputs_for(name: str, which: list[int], seed: int = 0) -> dict:
    """Inputs of the samples ``which``, one clip each (left-padded to the longest)."""
    clips = []
    for i in which:  # drawn per sample, so a sample's pixels do not depend on the batch
        g = torch.Generator().manual_seed(seed + 20 + i)
        f = clip_frames(name, i)
        if name.startswith("qwen"):
            side = QWEN_VIDEO // 4
            clips.append(torch.randn(f * side * side, 3 * 2 * 4 * 4, generator=g))
        else:
            clips.append(torch.randn(f, 3, IMG, IMG, generator=g))
    seqs = []
    for i in which:
        f = clip_frames(name, i)
        if name == "llava":
            tokens = [IMAGE] * (16 * f)
        elif name == "llava-onevision":
            tokens = [VIDEO] * (4 * f + 1)  # 2x2-pooled frames, then image_newline
        else:
            tokens = [VSTART, *[VIDEO] * (4 * f), VEND]
        before, _, after = _CLIPS[i]
        seqs.append(before + tokens + after)
    length = max(len(s) for s in seqs)
    ids = torch.tensor([[PAD] * (length - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs])
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "llava":
        out["pixel_values"] = torch.cat(clips)
    elif name == "llava-onevision":
        out["pixel_values_videos"] = torch.stack(clips)
    else:
        side = QWEN_VIDEO // 4
        out["pixel_values_videos"] = torch.cat(clips)
        out["video_grid_thw"] = torch.tensor([[clip_frames(name, i), side, side] for i in which])
        out["mm_token_type_ids"] = 2 * (ids == VIDEO).long()
        if name == "qwen2.5-vl":  # temporal positions spaced by tokens_per_second ticks
            out["second_per_grid_ts"] = torch.ones(len(which))
    return out


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _build(name)
    return model, inputs_for(name, model, list(range(len(_SAMPLES))))


def method_for(name: str, ratio: float):
    """The registered VLM method ``name`` at ``ratio`` as the tests run it: ``NAME+vtu`` is
    the projector method with DyMU's virtual unmerging; decoder methods act from layer 1 of
    the 3-layer LLM (AIM's pruning over layers 1-2)."""
    from tokenmerge.methods.base import REGISTRY

    if name.endswith("+vtu"):
        return REGISTRY[name[: -len("+vtu")]](ratio=ratio, vtu=True)
    cls = REGISTRY[name]
    if ratio == 0.0 and cls.site == "projector":
        return cls.example(0)  # budget 0: every stage off (HoliTom's in-LLM merge too)
    if cls.site == "decoder":
        return (
            cls(ratio=ratio, layer=1) if name != "aim_prune" else cls(ratio=ratio, start=1, end=2)
        )
    return cls(ratio=ratio)


def outputs(model, inputs: dict, method=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, sequences)``: a forward and a 3-token greedy ``generate`` on ``inputs``,
    under ``method`` (patched for both, then removed) or unpatched."""
    import tokenmerge as tm

    def run():
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, model.generate(**inputs, max_new_tokens=3, do_sample=False)

    if method is None:
        return run()
    with tm.patched(model, method):
        return run()


def visual_seen(model, method, batches: list[dict]) -> list[int]:
    """The visual tokens (``IMAGE`` placeholders kept) that the last LLM layer held for each
    of ``batches`` (one question each) under ``method``, read from the runtime."""
    import tokenmerge as tm
    from tokenmerge.adapters.hf_decoder import runtime_of

    seen = []
    for batch in batches:
        with tm.patched(model, method), torch.inference_mode():
            model(**batch)
            last = runtime_of(model).last
        text = batch["attention_mask"].sum(1) - (batch["input_ids"] == IMAGE).sum(1)
        seen += (last.tokens_per_layer[-1] - text).tolist()
    return seen


class FakeInputs:
    """``TinyLlavaInputs``' interface for the tiny LLaVA (16 tokens per image): an image's (or
    each frame of a clip's) tokens back to back, then the question as a few token ids; every
    other row is one token shorter, so batches are left-padded. The answer is the first
    generated token id (as text)."""

    image_token_id = IMAGE
    n_image_tokens = 16

    def batch(self, images, questions):
        return self.clips([[image] for image in images], questions)

    def clips(self, clips, questions):
        n = self.n_image_tokens
        rows = [
            [1, 5, *[IMAGE] * (n * len(c)), *[10 + ord(ch) % 80 for ch in q[:3]], 7]
            for c, q in zip(clips, questions, strict=True)
        ]
        rows = [r[: len(r) - (i % 2)] for i, r in enumerate(rows)]
        width = max(map(len, rows))
        ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        frames = torch.stack([f for c in clips for f in c])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": frames}

    def answers(self, generated, batch):
        return [str(int(t)) for t in generated[:, batch["input_ids"].shape[1]]]


def half_right(model, inputs: FakeInputs, batch: dict, items: list[dict]) -> None:
    """Set the items' gold answers (one per row of ``batch``): the unreduced model's own for
    even ids, ``"none"`` for odd ones, so the unreduced accuracy is 0.5."""
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    for it, a in zip(items, inputs.answers(out, batch), strict=True):
        it["answer"] = a if it["id"] % 2 == 0 else "none"
