"""Diffusion denoisers for the diffusion bench: the published architectures of Stable Diffusion
1.5's and SDXL's UNets with **random weights** (for speed only: no weights ship offline, and the
time of a step does not depend on weight values), tiny configurations of the four families the
diffusers adapter patches (for fidelity and tests), and hub names (``hf:NAME``: a
``UNet2DConditionModel`` from a hub id or a local folder, for users who have weights).

:func:`load_diffusion` returns the model and a :class:`DiffusionInputs`, which builds one
denoising step's inputs for a batch size and an image resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "NATIVE",
    "SD15_UNET",
    "SDXL_UNET",
    "TINY",
    "DiffusionInputs",
    "build",
    "count_params",
    "load_diffusion",
]

#: ``runwayml/stable-diffusion-v1-5``'s ``unet/config.json`` (859.5M parameters)
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}  # fmt: skip

#: ``stabilityai/stable-diffusion-xl-base-1.0``'s ``unet/config.json`` (2567.5M parameters)
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_TINY_UNET_COMMON: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}

#: tiny configurations: random weights, seconds on a CPU; one per family the adapter patches
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    # SD-1.5's layout: cross-attention at the two finest levels, none at the coarsest
    "tiny-unet": ("UNet2DConditionModel", {
        **_TINY_UNET_COMMON,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }),
    # SDXL's layout: no attention at the finest level, SDXL's text_time conditioning
    "tiny-sdxl-unet": ("UNet2DConditionModel", {
        **_TINY_UNET_COMMON,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
    }),
    # DiT: class-conditional, adaLN-Zero
    "tiny-dit": ("Transformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
        "num_layers": 2, "sample_size": 16, "patch_size": 2, "norm_type": "ada_norm_zero",
        "num_embeds_ada_norm": 10, "activation_fn": "gelu-approximate", "norm_num_groups": 4,
        "norm_elementwise_affine": False,
    }),
    "tiny-pixart": ("PixArtTransformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
        "num_layers": 2, "sample_size": 16, "patch_size": 2, "cross_attention_dim": 16,
        "caption_channels": 24, "use_additional_conditions": False, "norm_num_groups": 4,
    }),
    "tiny-sd3": ("SD3Transformer2DModel", {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 24,
        "caption_projection_dim": 16, "pooled_projection_dim": 12, "pos_embed_max_size": 64,
    }),
}  # fmt: skip

#: every name :func:`build` knows: ``name -> (diffusers class, config)``
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd15-unet-random": ("UNet2DConditionModel", SD15_UNET),
    "sdxl-unet-random": ("UNet2DConditionModel", SDXL_UNET),
    **TINY,
}
#: the resolutions (pixels) each model was trained at: the bench's defaults
NATIVE: dict[str, tuple[int, ...]] = {
    "sd15-unet-random": (512, 1024),
    "sdxl-unet-random": (1024,),
    **{k: (8 * cfg["sample_size"],) for k, (_, cfg) in TINY.items()},
}
#: pixels per latent pixel (the Stable Diffusion VAE's downsampling)
VAE_SCALE = 8


def _cls(name: str) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, ARCHS[name][0])


def _known(name: str) -> None:
    if name not in ARCHS:
        raise KeyError(
            f"unknown diffusion model {name!r}; known: {', '.join(ARCHS)}; or 'hf:NAME' (a hub "
            "id or a local folder holding a UNet2DConditionModel, in unet/ or at its top)"
        )


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` of :data:`ARCHS` with diffusers' default random initialisation drawn
    from ``seed`` (eval mode, CPU, float32); the global RNG is left as it was."""
    _known(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _cls(name)(**ARCHS[name][1])
    return model.float().eval()


def count_params(name: str) -> int:
    """The parameter count of ``name``, built on the meta device (no memory, no init)."""
    _known(name)
    with torch.device("meta"):
        model = _cls(name)(**ARCHS[name][1])
    return sum(p.numel() for p in model.parameters())


def _from_hub(name: str) -> nn.Module:
    """``UNet2DConditionModel.from_pretrained`` of a hub id or a local pipeline folder (its
    ``unet/``); a local folder that is itself the UNet's also loads."""
    from diffusers import UNet2DConditionModel

    folder = Path(name)
    if folder.is_dir() and (folder / "config.json").is_file() and not (folder / "unet").is_dir():
        model = UNet2DConditionModel.from_pretrained(name, torch_dtype=torch.float32)
    else:
        model = UNet2DConditionModel.from_pretrained(
            name, subfolder="unet", torch_dtype=torch.float32
        )
    return model.float().eval()


def load_diffusion(name: str, seed: int = 0) -> tuple[nn.Module, DiffusionInputs]:
    """``(model, inputs)``: a model of :data:`ARCHS` (random weights from ``seed``), or
    ``hf:NAME`` (a hub id or a local folder), and the builder of its inputs."""
    if name.startswith("hf:"):
        rest = name[3:]
        if not rest:
            raise ValueError(f"{name!r}: give a hub id or a folder after hf:")
        model = _from_hub(rest)
    else:
        model = build(name, seed)
    return model, DiffusionInputs.of(model)


@dataclass(frozen=True)
class DiffusionInputs:
    """Builds one denoising step's keyword arguments for a model; call it with a batch size
    and an image resolution in pixels (latents are ``resolution / 8`` on a side).

    ``family`` is ``"unet"``, ``"dit"``, ``"pixart"`` or ``"sd3"``; the other fields are read
    from the model's config by :meth:`of`."""

    family: str
    latent_channels: int
    text_dim: int | None  # width of encoder_hidden_states (None: DiT, class-conditional)
    text_len: int  # conditioning tokens (CLIP's 77 for the UNets)
    pooled_dim: int | None = None  # SDXL's text_embeds, SD3's pooled_projections
    time_ids: bool = False  # SDXL's micro-conditioning (sizes and crop)
    classes: int | None = None  # DiT's class labels
    size_conditions: bool = False  # PixArt-alpha 1024's resolution and aspect ratio

    @classmethod
    def of(cls, model: nn.Module) -> DiffusionInputs:
        """The inputs of a diffusers ``UNet2DConditionModel``, ``Transformer2DModel`` (DiT),
        ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel``."""
        c, kind = model.config, type(model).__name__
        if kind == "UNet2DConditionModel":
            if c.addition_embed_type not in (None, "text_time"):
                raise ValueError(f"addition_embed_type {c.addition_embed_type!r} is not built")
            text_time = c.addition_embed_type == "text_time"
            pooled = (
                c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                if text_time
                else None
            )
            return cls("unet", c.in_channels, c.cross_attention_dim, 77, pooled, text_time)
        if kind == "Transformer2DModel" and c.patch_size is not None:
            return cls("dit", c.in_channels, None, 0, classes=c.num_embeds_ada_norm)
        if kind == "PixArtTransformer2DModel":
            cond = bool(c.use_additional_conditions) or (
                c.use_additional_conditions is None and c.sample_size == 128
            )  # diffusers' own default
            return cls("pixart", c.in_channels, c.caption_channels, 16, size_conditions=cond)
        if kind == "SD3Transformer2DModel":
            return cls("sd3", c.in_channels, c.joint_attention_dim, 16, c.pooled_projection_dim)
        raise ValueError(
            f"no inputs known for {kind}; known: UNet2DConditionModel, Transformer2DModel "
            "(patched, DiT), PixArtTransformer2DModel, SD3Transformer2DModel"
        )

    def __call__(self, batch_size: int, resolution: int, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of one step (``return_dict=False``: the output is a tuple) for
        ``batch_size`` images of ``resolution`` x ``resolution`` pixels."""
        if resolution % VAE_SCALE:
            raise ValueError(f"resolution {resolution} is not a multiple of {VAE_SCALE}")
        g = torch.Generator().manual_seed(seed)
        side = resolution // VAE_SCALE
        x = torch.randn(batch_size, self.latent_channels, side, side, generator=g)
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        kw: dict[str, Any] = {"return_dict": False}
        text = (
            torch.randn(batch_size, self.text_len, self.text_dim, generator=g)
            if self.text_dim
            else None
        )
        if self.family == "unet":
            kw |= {"sample": x, "timestep": t[0], "encoder_hidden_states": text}
            if self.time_ids:  # original size, crop top-left, target size
                ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution])
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(batch_size, self.pooled_dim, generator=g),
                    "time_ids": ids.float().expand(batch_size, 6),
                }
            return kw
        kw |= {"hidden_states": x, "timestep": t}
        if self.family == "dit":
            return kw | {"class_labels": torch.randint(0, self.classes or 1, (batch_size,),
                                                       generator=g)}  # fmt: skip
        if self.family == "pixart":
            cond = (
                {
                    "resolution": torch.tensor([[resolution, resolution]] * batch_size).float(),
                    "aspect_ratio": torch.ones(batch_size, 1),
                }
                if self.size_conditions
                else {"resolution": None, "aspect_ratio": None}
            )
            return kw | {"encoder_hidden_states": text, "added_cond_kwargs": cond}
        pooled = torch.randn(batch_size, self.pooled_dim or 0, generator=g)
        return kw | {"encoder_hidden_states": text, "pooled_projections": pooled}
