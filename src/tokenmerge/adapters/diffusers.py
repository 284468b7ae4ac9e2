"""diffusers: tomesd's merge -> compute -> unmerge in the transformer blocks of Stable Diffusion
UNets (1.x, 2.x, SDXL) and DiTs (DiT, PixArt, SD3).

Nothing of diffusers is copied. Hooks do all the work:

- the model's pre-hook starts the step: each sample's draw key (its timestep) and, for a DiT,
  the latent grid; each UNet ``Transformer2DModel`` records the grid of its input map;
- a block's pre-hook computes the merge from the block's input (:class:`~tokenmerge.ToMeSD`);
- each chosen sub-layer (``attn1``, ``attn2``, ``ff``; SD3's joint ``attn``) gets a pre-hook
  that merges its input tokens and a post-hook that copies its output back onto every token
  (the unmerge), so the residual stream, the convolutions and the output keep their shapes;
- the model's post-hook checks that every scheduled merge happened (otherwise
  :class:`~.base.ReductionNotApplied`).

The sub-layers are diffusers' own modules, whatever their attention processor, so SDPA,
xFormers and custom processors keep working; a ratio of 0 leaves every call untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.flops import CostModel
from ..core.reduction import Reduction
from ..methods.base import Method
from ..methods.tomesd import ToMeSD
from .base import ADAPTERS, Adapter, ContextSlot, Target, UnsupportedModelError, not_applied

#: the models this adapter patches, and what they are
MODELS = {
    "UNet2DConditionModel": "Stable Diffusion 1.x/2.x and SDXL UNets",
    "Transformer2DModel": "DiT (patched latents) and a UNet's spatial transformer",
    "PixArtTransformer2DModel": "PixArt-alpha/sigma",
    "SD3Transformer2DModel": "Stable Diffusion 3/3.5 (MMDiT)",
}
#: block class -> {option: the sub-layer attributes it merges around}
SUBLAYERS = {
    "BasicTransformerBlock": {"self_attn": ("attn1",), "cross_attn": ("attn2",), "mlp": ("ff",)},
    "JointTransformerBlock": {"self_attn": ("attn", "attn2"), "cross_attn": (), "mlp": ("ff",)},
}
#: the attribute that holds the runtime of a patched model (see :func:`runtime_of`)
RUNTIME = "_tokenmerge_diffusion"


@dataclass(frozen=True)
class MergeRecord:
    """What one block did in the latest forward: ``tokens`` in, ``kept`` after the merge
    (``tokens`` when it merged nothing), and the sub-layers it merged around."""

    block: str
    downsample: int
    tokens: int
    kept: int
    sublayers: tuple[str, ...]


@dataclass
class _Owner:
    """A module whose forward turns a latent map into the tokens of its blocks."""

    module: nn.Module
    downsample: int  # the UNet level's factor (1 in a DiT)
    patch: int  # latent pixels per token side (DiT patch size; 1 in a UNet)


@dataclass
class _Block:
    name: str
    module: nn.Module
    owner: int
    index: int  # among the patched blocks: keys the block's draw
    sublayers: list[tuple[str, nn.Module]]  # (attribute, module) merged around


@dataclass
class _Step:
    """One forward of the patched model."""

    keys: Tensor  # [B] int64: each sample's timestep, keying its draws
    expected: int  # blocks that must run (SD3's skip_layers run fewer)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    merge: Reduction | None = None  # the current block's merge
    pending: list[str] = field(default_factory=list)  # its sub-layers still to run
    records: list[MergeRecord] = field(default_factory=list)


class _Runtime:
    """The hooks of one patched model and the state of its forwards."""

    def __init__(self, model: nn.Module, owners: list[_Owner], blocks: list[_Block]) -> None:
        self.model = model
        self.owners = owners
        self.blocks = blocks
        self.signature = inspect.signature(model.forward)
        self.first = next(iter(self.signature.parameters))  # the latents
        self.method: ToMeSD | None = None
        self._step = ContextSlot(f"tokenmerge_step_{id(self)}")
        self._last = ContextSlot(f"tokenmerge_last_{id(self)}")

    def bind(self, patch: Any) -> _Runtime:
        self.method = patch.method
        patch.slots += [self._step, self._last]
        return self

    @property
    def last(self) -> list[MergeRecord] | None:
        """One record per block that ran in the latest forward in this context."""
        return self._last.get()

    def _error(self, what: str) -> Exception:
        assert self.method is not None
        return not_applied("unmerge", self.method, what)

    # ------------------------------------------------------------------ the model
    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(module, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
            raise ValueError(
                f"tokenmerge: {type(module).__name__} has gradient checkpointing on, which "
                "re-runs its blocks outside the forward; disable it while ToMeSD is applied"
            )
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x = bound.get(self.first)
        if not isinstance(x, Tensor):
            raise ValueError(f"tokenmerge: {type(module).__name__} was called without {self.first}")
        # SD3's skip-layer guidance skips blocks by position; a DiT's blocks are all patched,
        # in order, so a block's index is its position
        skip = bound.get("skip_layers") or ()
        step = _Step(keys=_step_keys(bound.get("timestep"), x), expected=len(self.blocks))
        step.expected -= sum(1 for b in self.blocks if b.index in skip)
        self._step.set(step)
        self._last.set(None)

    def model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step: _Step = self._step.get()
        self._step.set(None)
        self._last.set(step.records)
        assert self.method is not None
        if self.method.is_identity:
            return
        self._finish_block(step)
        if len(step.records) != step.expected:
            raise self._error(
                f"{len(step.records)} of the {step.expected} patched transformer blocks ran "
                f"their merge in {type(module).__name__}.forward (a framework change bypasses "
                "the blocks' forward hooks)"
            )

    def owner_pre(self, i: int) -> Callable[..., None]:
        owner = self.owners[i]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise UnsupportedModelError(
                    f"tokenmerge: {type(module).__name__} was called with "
                    f"{_shape(x)} hidden states; the diffusers adapter reads the token grid "
                    "from a latent map [B, C, H, W]"
                )
            step = self._current(module)
            h, w = x.shape[-2] // owner.patch, x.shape[-1] // owner.patch
            step.grids[i] = (h, w)

        return hook

    def _current(self, module: nn.Module) -> _Step:
        step = self._step.get()
        if step is None:
            raise RuntimeError(
                f"tokenmerge: {type(module).__name__} of a patched "
                f"{type(self.model).__name__} ran outside the model's forward; call the model "
                "itself (or tm.remove it first)"
            )
        return step

    # ------------------------------------------------------------------ blocks
    def block_pre(self, b: _Block) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = self._current(module)
            method = self.method
            assert method is not None
            self._finish_block(step)
            x = args[0] if args else kwargs["hidden_states"]
            grid = step.grids.get(b.owner)
            if grid is None or grid[0] * grid[1] != x.shape[1]:
                raise RuntimeError(
                    f"tokenmerge: block {b.name} received {x.shape[1]} tokens, not the "
                    f"{_grid_text(grid)} grid of its latent map"
                )
            red = None
            if not method.is_identity:
                red = method.reduction(x, grid, step.keys.to(x.device), b.index)
            step.merge = red
            step.pending = [] if red is None else [name for name, _ in b.sublayers]
            kept = x.shape[1] if red is None else red.n_out
            owner = self.owners[b.owner]
            names = tuple(step.pending)
            step.records.append(MergeRecord(b.name, owner.downsample, x.shape[1], kept, names))

        return hook

    def _finish_block(self, step: _Step) -> None:
        if step.pending:
            raise self._error(
                f"block {step.records[-1].block} merged its tokens, but its sub-layers "
                f"{', '.join(step.pending)} never ran through the merge hooks"
            )
        step.merge = None

    def sub_pre(self, name: str) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            step = self._current(module)
            red = step.merge
            if red is None:
                return None
            if name not in step.pending:
                raise self._error(
                    f"sub-layer {name} ran after block {step.records[-1].block} had finished "
                    "(a block's forward hook was bypassed)"
                )
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, Tensor) or x.shape[:2] != red.index.shape[:2]:
                raise RuntimeError(
                    f"tokenmerge: {name} received {_shape(x)} hidden states, not the block's "
                    f"{tuple(red.index.shape[:2])} tokens (feed-forward chunking, "
                    "set_chunk_feed_forward / enable_forward_chunking, splits them: disable "
                    "it, or set mlp=False)"
                )
            self_mask = kwargs.get("attention_mask") is not None or len(args) > 2
            if name != "ff" and kwargs.get("encoder_hidden_states") is None and self_mask:
                raise ValueError(
                    f"tokenmerge: {name} was called with a self-attention mask over the "
                    "original tokens, which cannot follow merged ones; call it without one"
                )
            if "ip_adapter_masks" in kwargs:
                raise ValueError(
                    "tokenmerge: IP-Adapter masks select query tokens, which merging moves; "
                    "ToMeSD with cross_attn=True cannot run with ip_adapter_masks"
                )
            merged = red.apply(x)[0]
            if args:
                return (merged, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": merged}

        return hook

    def sub_post(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            step = self._current(module)
            red = step.merge
            if red is None:
                return None
            step.pending.remove(name)
            if not step.pending:  # the block is done: later sub-layers run unmerged
                step.merge = None
            if isinstance(output, tuple):  # SD3's joint attention: (image tokens, context)
                return (red.unmerge(output[0]), *output[1:])
            return red.unmerge(output)

        return hook


def _step_keys(timestep: Any, x: Tensor) -> Tensor:
    """``[B]`` int64 draw keys from the timestep (a number, or a tensor of one or ``B``
    values; fractional timesteps of flow-matching models in 1/64 steps), 0 without one."""
    b = x.shape[0]
    if timestep is None:
        return torch.zeros(b, dtype=torch.long, device=x.device)
    t = torch.as_tensor(timestep, device=x.device).double().flatten()
    keys = torch.round(t * 64).long()
    return keys.expand(b) if keys.numel() == 1 else keys


def _shape(x: Any) -> str:
    return f"{tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _grid_text(grid: tuple[int, int] | None) -> str:
    return "unknown" if grid is None else f"{grid[0]}x{grid[1]}"


# ---------------------------------------------------------------------- finding the blocks
def _levels(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every spatial transformer of a UNet with its level's downsampling factor, read from
    the structure: down blocks halve the map after their downsamplers, up blocks double it
    after their upsamplers."""
    out, factor = [], 1
    for i, blk in enumerate(unet.down_blocks):
        out += [(f"down_blocks.{i}.attentions.{j}", a, factor) for j, a in _attns(blk)]
        if getattr(blk, "downsamplers", None):
            factor *= 2
    if unet.mid_block is not None:
        out += [(f"mid_block.attentions.{j}", a, factor) for j, a in _attns(unet.mid_block)]
    for i, blk in enumerate(unet.up_blocks):
        out += [(f"up_blocks.{i}.attentions.{j}", a, factor) for j, a in _attns(blk)]
        if getattr(blk, "upsamplers", None):
            factor //= 2
    return out


def _attns(blk: nn.Module) -> list[tuple[int, nn.Module]]:
    return list(enumerate(getattr(blk, "attentions", None) or []))


def _refuse(model: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__}: {what}; tokenmerge's diffusers adapter supports "
        + "; ".join(f"{k} ({v})" for k, v in MODELS.items())
        + ", and will not patch this model half-way"
    )


def _owners(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, module, downsample, patch)`` for every module that hands blocks a token grid."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if name == "UNet2DConditionModel":
        found = _levels(model)
        for path, m, _ in found:
            if type(m).__name__ != "Transformer2DModel" or not m.is_input_continuous:
                raise _refuse(model, f"its {path} is a {type(m).__name__}")
        return [(path, m, f, 1) for path, m, f in found]
    if name == "Transformer2DModel" and not (model.is_input_continuous or model.is_input_patches):
        raise _refuse(model, "discrete (vector-quantised) inputs have no latent grid")
    p = int(getattr(cfg, "patch_size", None) or 1)
    if name == "Transformer2DModel" and model.is_input_continuous:
        p = 1
    return [("", model, 1, p)]


def _blocks_of(owner: nn.Module, model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    blocks = list(owner.transformer_blocks)
    for j, blk in enumerate(blocks):
        if type(blk).__name__ not in SUBLAYERS:
            raise _refuse(
                model,
                f"{path + '.' if path else ''}transformer_blocks.{j} is a "
                f"{type(blk).__name__} (known blocks: {', '.join(SUBLAYERS)})",
            )
    prefix = f"{path}.transformer_blocks" if path else "transformer_blocks"
    return [(f"{prefix}.{j}", b) for j, b in enumerate(blocks)]


def _check_unclaimed(model: nn.Module, claimed: set[int]) -> None:
    """Every attention module of the model must sit in a block this adapter knows."""
    for path, m in model.named_modules():
        if hasattr(m, "set_processor") and id(m) not in claimed:
            raise _refuse(model, f"its attention {path} is outside the known transformer blocks")


def diffusion_target(model: nn.Module, method: ToMeSD) -> Target:
    """The hooks that run ``method`` on ``model`` (refused by name when unknown)."""
    found = _owners(model)
    levels = sorted({f for _, _, f, _ in found})
    if not levels:
        raise _refuse(model, "it has no transformer blocks")
    limit = levels[0] if method.max_downsample is None else method.max_downsample
    if limit < levels[0]:
        raise ValueError(
            f"ToMeSD(max_downsample={limit}) patches none of {type(model).__name__}'s "
            f"transformer blocks: they sit at downsampling factors {levels}; use "
            f"max_downsample={levels[0]} or more, or None (the highest-resolution level)"
        )
    owners: list[_Owner] = []
    blocks: list[_Block] = []
    claimed: set[int] = set()
    wanted = [k for k in ("self_attn", "cross_attn", "mlp") if getattr(method, k)]
    present: set[str] = set()
    for path, owner, factor, patch in found:
        for name, blk in _blocks_of(owner, model, path):
            table = SUBLAYERS[type(blk).__name__]
            claimed |= {id(m) for m in blk.modules() if hasattr(m, "set_processor")}
            if factor > limit:
                continue
            chosen = [(k, a) for k in wanted for a in table[k] if getattr(blk, a, None) is not None]
            present |= {k for k, _ in chosen}
            if not owners or owners[-1].module is not owner:
                owners.append(_Owner(owner, factor, patch))
            subs = [(a, getattr(blk, a)) for _, a in chosen]
            blocks.append(_Block(name, blk, len(owners) - 1, len(blocks), subs))
    _check_unclaimed(model, claimed)
    missing = [k for k in wanted if k not in present]
    if missing:
        raise ValueError(
            f"ToMeSD({', '.join(f'{k}=True' for k in missing)}): the patched blocks of "
            f"{type(model).__name__} have no such sub-layer (a class-conditional DiT has "
            "no cross-attention; SD3's joint attention has none apart from self-attention"
        )
    rt = _Runtime(model, owners, blocks)
    pre: list[tuple[nn.Module, Callable]] = [(model, lambda p: rt.model_pre)]
    pre += [(o.module, lambda p, i=i: rt.owner_pre(i)) for i, o in enumerate(owners)]
    post: list[tuple[nn.Module, Callable]] = []
    for b in blocks:
        pre.append((b.module, lambda p, b=b: rt.block_pre(b)))
        for attr, sub in b.sublayers:
            pre.append((sub, lambda p, a=attr: rt.sub_pre(a)))
            post.append((sub, lambda p, a=attr: rt.sub_post(a)))
    post.append((model, lambda p: rt.model_post))
    first = blocks[0].module
    dim = (getattr(first, "attn1", None) or first.attn).to_q.in_features
    return Target(
        family="diffusers",
        blocks=[],  # no forward is replaced: hooks only
        spec=None,  # type: ignore[arg-type]
        cost=CostModel(depth=len(blocks), dim=dim, mlp_dim=4 * dim),
        n_prefix=0,
        prop_attn=False,
        extra_patches=[(model, RUNTIME, rt.bind)],
        pre_hooks=pre,
        post_hooks=post,
    )


class DiffusersAdapter(Adapter):
    family = "diffusers"
    description = (
        "diffusers "
        + ", ".join(MODELS)
        + " (tomesd's merge -> compute -> unmerge around self-attention, cross-attention, MLP)"
    )
    sites = frozenset({"unmerge"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in MODELS and type(model).__module__.startswith("diffusers.")

    def target(self, model: nn.Module) -> Target:
        return diffusion_target(model, ToMeSD())

    def target_for(self, model: nn.Module, method: Method) -> Target:
        if not isinstance(method, ToMeSD):
            raise TypeError(f"the diffusers adapter runs ToMeSD, not {type(method).__name__}")
        return diffusion_target(model, method)


ADAPTERS.append(DiffusersAdapter())


def runtime_of(model: nn.Module) -> _Runtime:
    """The diffusers runtime of a patched model: ``runtime_of(unet).last`` lists what every
    block did in the latest forward (:class:`MergeRecord`)."""
    rt = vars(model).get(RUNTIME)
    if rt is None:
        raise ValueError(f"{type(model).__name__} is not patched with ToMeSD")
    return rt
