"""The hooks of one patched VLM: the decoder runtime, told where the images are.

The VLM's own forward builds the LLM's input (text embeddings with the projected visual tokens
scattered in, and for Qwen2-VL the 3-D M-RoPE positions) and calls its language model; the
hf-decoder runtime's hooks sit on that language model as on any decoder LLM. This runtime adds:

- a pre-hook on the VLM that records the call's ``input_ids`` (where the image placeholders
  are), and one on its language model that records the position ids (Qwen2-VL's M-RoPE
  ``(t, h, w)`` give each image's grid);
- the **projector site**: before the first decoder layer of a prefill, every image's visual
  tokens are cut out of the sequence, reduced by the projector method one image per row
  (:class:`~tokenmerge.methods.projector.VisualTokens`), and put back in order. Every token
  keeps its original position (that of its representative), so text after an image keeps its
  positions, RoPE (M-RoPE included) stays exact, and ``generate`` continues after every token
  seen;
- the **decoder site on images**: a decoder method (FastV, AIM pruning, HoliTom's inner merge)
  reduces the image tokens only, whatever its ``span``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.reduction import Reduction
from ...methods.decoder import DecoderMethod
from ...methods.projector import ProjectorMethod, VisualTokens
from ..base import ContextSlot, UnsupportedModelError
from ..hf_decoder.compat import Signature
from ..hf_decoder.forward import _Forward
from ..hf_decoder.ops import _gather_seq, _hidden
from ..hf_decoder.runtime import _Runtime
from . import layout
from .families import VLMParts
from .saliency import saliency_of


@dataclass
class _Call:
    """What the current VLM call was given."""

    ids: Tensor | None


class _VLMRuntime(_Runtime):
    knows_frames = True

    def __init__(
        self, model: nn.Module, inner: nn.Module, layers: Sequence[nn.Module], parts: VLMParts
    ) -> None:
        super().__init__(model, inner, layers)
        self.parts = parts
        self.vlm_sig = Signature.of(model, ("input_ids",))
        self.saliency = saliency_of(parts.base, parts.vision_tower, parts.layout)
        self._call = ContextSlot(f"tokenmerge_vlm_call_{id(self)}")
        self._positions = ContextSlot(f"tokenmerge_vlm_positions_{id(self)}")
        self._inner: DecoderMethod | None = None  # a projector method's in-LLM stage

    def _shortens(self) -> bool:
        proj = self.projector
        if proj is not None:
            return not proj.is_identity
        return super()._shortens() or self._tower_merges()

    def _tower_merges(self) -> bool:
        """A block-site method merges inside the vision tower."""
        m = self.method
        return m is not None and m.site == "block" and (m.dynamic or not m.budget.is_zero)

    @property
    def projector(self) -> ProjectorMethod | None:
        return self.method if isinstance(self.method, ProjectorMethod) else None

    @property
    def decoder(self) -> DecoderMethod | None:
        """The decoder-site method, or a projector method's in-LLM stage (HoliTom's)."""
        return self._inner if self.projector is not None else super().decoder

    def bind(self, patch: Any) -> _VLMRuntime:
        method = patch.method
        if (
            isinstance(method, ProjectorMethod)
            and "saliency" in method.visual_needs
            and self.saliency.error is not None
        ):
            raise UnsupportedModelError(
                f"{method.name} ranks visual tokens by the vision tower's attention: "
                f"{self.saliency.error}"
            )
        super().bind(patch)
        if isinstance(method, ProjectorMethod):
            self._inner = method.inner(self.depth)
            if self._inner is not None:
                self._inner.schedule(self.depth)  # validates the layer
        self.patch = patch  # a tower (block-site) method's token state is the patch's
        patch.slots += [self._call, self._positions]
        if self.saliency.error is None:
            patch.slots += [self.saliency.captured, self.saliency.sizes]
        return self

    # -------------------------------------------------------------- the VLM call
    def outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            kwargs, args = self.vlm_sig.bind(args, kwargs), ()
        self._call.set(_Call(kwargs.get("input_ids")))
        return super().outer_pre(module, args, kwargs)

    def outer_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self._call.set(None)
        if self.saliency.error is None:
            self.saliency.captured.set(None)
        return super().outer_post(module, args, kwargs, output)

    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = super().model_pre(module, args, kwargs)
        self._positions.set(kwargs.get("position_ids"))  # Qwen2-VL: the image grid's (t, h, w)
        return args, kwargs

    def _schedule(self, run: _Forward) -> None:
        call = self._call.get()
        ids = None if call is None else call.ids
        if ids is not None and ids.shape[1] == run.input_valid.shape[1]:
            visual = self._video_ids(ids) | (ids == self.parts.image_token_id)
            run.span_input = visual & run.input_valid
        proj = self.projector
        if proj is None and not self._tower_merges():
            super()._schedule(run)
            return
        if proj is not None and proj.is_identity:
            return
        if run.span_input is not None and bool(run.span_input.any()):  # images in this prefill
            if proj is None or proj.ratio > 0:
                run.schedule = {0: 1.0 if proj is None else 1.0 - proj.ratio}
            if self._inner is not None:  # then in the LLM, on what the projector site kept
                run.schedule.update(self._inner.schedule(self.depth))
                run.span_count = self._span(run).sum(1)
        elif proj is not None and call is not None and ids is None:
            raise ValueError(
                f"{proj.name} needs input_ids to find the image tokens (this call passed "
                "inputs_embeds only)"
            )

    def _video_ids(self, ids: Tensor) -> Tensor:
        """``[B, q]`` the video placeholders (none for a class without video input)."""
        video = self.parts.video_token_id
        return ids == video if video is not None else torch.zeros_like(ids, dtype=torch.bool)

    # -------------------------------------------------------------- VTU's attention
    def attn_expand(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """VTU: the attention sees every original position, each with its merged token."""
        run = self._fwd.get()
        if run is None or run.virtual is None:
            return args, kwargs
        h = _hidden(args, kwargs)
        full = _gather_seq(h, run.virtual.clamp_max(h.shape[1] - 1))
        if args:
            return (full, *args[1:]), kwargs
        kwargs["hidden_states"] = full
        return args, kwargs

    def attn_merge(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """VTU: the attention output re-merged, ``o_s = mean_{j: m(j)=s} O_j``."""
        run = self._fwd.get()
        if run is None or run.virtual is None:
            return output
        o = output[0]
        b, _, c = o.shape
        n = run.rep.shape[1]
        idx = run.virtual[..., None].expand(-1, -1, c)
        total = o.new_zeros(b, n + 1, c).scatter_add_(1, idx, o)
        count = o.new_zeros(b, n + 1).scatter_add_(1, run.virtual, o.new_ones(run.virtual.shape))
        merged = (total / count.clamp_min(1)[..., None])[:, :n]
        return (merged, *output[1:])

    # -------------------------------------------------------------- the projector site
    def _reduce_hidden(self, i: int, run: _Forward, args: tuple, kwargs: dict) -> tuple:
        if i > 0 or (self.projector is None and not self._tower_merges()):
            return super()._reduce_hidden(i, run, args, kwargs)  # the decoder site
        run.done.add(i)
        x = _hidden(args, kwargs)
        units = self._units(run, x)
        y, rep, valid, virtual = self._reduce_units(run, x, units)
        run.virtual = virtual  # VTU: attention keeps the full sequence (and the cache stores it)
        out = self._continue_on(run, y, rep, valid, args, kwargs, stored=virtual is None)
        if self._inner is not None:
            run.span_count = self._span(run).sum(1)  # the in-LLM stage's share is of these
        return out

    def _cells(self, run: _Forward, i: int, x: Tensor) -> Tensor:
        """``[B, n]`` the video cell of every current slot (:attr:`Signals.cell`): clip ``j``'s
        position ``(r, c)`` in a ``rows x cols`` frame is ``j · P + r · cols + c`` (``P`` the
        largest frame), the same in each of its frames; ``-1`` for images and text. Read at
        layer 0 (the embeddings: OneVision's newline tokens are found by value)."""
        if run.cells is None:
            if i != 0:
                raise self._fail(run, f"video frames can only be read at layer 0, not {i}")
            units = self._units(run, x)
            grid = units.grid[..., 0] * units.grid[..., 1]
            p = max(int(grid.max()), 1) if grid.numel() else 1
            cols = units.grid[..., 1].gather(1, units.part.clamp_min(0))
            clip = torch.arange(len(units), device=x.device)[:, None]
            cell = clip * p + units.coord[..., 0] * cols + units.coord[..., 1]
            video = units.valid & ~units.protected & (units.frames[:, None] > 1)
            cells = torch.full(run.input_valid.shape, -1, dtype=torch.long, device=x.device)
            rows = units.sample[:, None].expand_as(units.index)
            cells[rows[video], units.index[video]] = cell[video]
            run.cells = cells
        slot = (run.rep - run.seen).clamp(0, run.cells.shape[1] - 1)
        return run.cells.gather(1, slot).masked_fill(~run.valid, -1)

    def _units(self, run: _Forward, x: Tensor) -> layout.Units:
        parts, base = self.parts, self.parts.base
        spans = layout.runs(run.span_input)
        cfg = base.config
        if parts.layout == "mrope":
            pos = self._positions.get()
            if pos is None or pos.dim() != 3:
                raise self._error("the language model was not given 3-D M-RoPE position ids")
            images = layout.mrope_images(spans, pos)
        else:
            side = cfg.vision_config.image_size // cfg.vision_config.patch_size
            cls = parts.cls_token and cfg.vision_feature_select_strategy == "full"
            if parts.layout == "grid":
                images = layout.grid_images(spans, side, cls)
            else:
                newline = (x == base.image_newline.to(x.dtype)).all(-1)
                call = self._call.get()
                video = None if call is None else self._video_ids(call.ids)
                images = layout.anyres_images(spans, newline, side, cls, video)
        return layout.pack(images, x.device)

    def _visual(
        self, run: _Forward, x: Tensor, units: layout.Units, needs: frozenset[str]
    ) -> VisualTokens:
        v = VisualTokens(
            x=x[units.sample[:, None], units.index],
            valid=units.valid,
            protected=units.protected,
            coord=units.coord,
            part=units.part,
            grid=units.grid,
            frames=units.frames,
        )
        if "saliency" in needs:
            v.saliency = self._saliency(units)
        if "text" in needs:
            # the text after each image in its sample (its question), images excluded
            last = units.index.masked_fill(~units.valid, -1).amax(1)
            pos = torch.arange(x.shape[1], device=x.device)
            s = units.sample
            text = run.valid[s] & ~run.span_input[s] & (pos[None] > last[:, None])
            t = max(int(text.sum(1).max()), 1)
            order = torch.argsort((~text).long(), dim=1, stable=True)[:, :t]
            v.text = x[s[:, None], order]
            v.text_valid = text.gather(1, order)
        return v

    def _tower_groups(self, units: layout.Units) -> tuple[Reduction, Tensor]:
        """The vision tower's merges as a reduction of each image's visual tokens: tokens the
        tower merged (handed on as copies of one value, dense mode) become one token again,
        the first copy at its position; tokens it pruned are dropped. Returns the reduction and
        the tokens each image must keep (what the tower kept)."""
        if bool((units.frames > 1).any()):
            raise ValueError(
                f"{self.method.name} merges inside the vision tower, frame by frame: a video "
                "clip's frames are not supported there; reduce clips at the projector site "
                "(tm.get_method('random_proj' / 'downsample_proj' / ..., ratio=...))"
            )
        st = self.patch.state
        if st is None or len(units) != st.pos.shape[0]:
            raise self._error("the vision tower's token state does not match the images")
        group, sent = st.source.destination()  # original tower tokens -> its final tokens
        gone = ~sent
        drop_cls = (
            st.n_prefix if self.parts.base.config.vision_feature_select_strategy == "default" else 0
        )
        group, gone = group[:, drop_cls:], gone[:, drop_cls:]
        u, t = units.valid.shape
        if group.shape[1] != t:
            raise self._error(f"{group.shape[1]} tower tokens for {t} visual tokens per image")
        group = group.masked_fill(gone | ~units.valid, group.shape[1] + st.pos.shape[1])
        ar = torch.arange(t, device=group.device).expand(u, t)
        first = torch.full((u, int(group.max()) + 1), t, device=group.device, dtype=torch.long)
        first.scatter_reduce_(1, group, ar, reduce="amin")
        # the copies are equal: keep the first exactly (a mean could change the last bit)
        first_of = first.gather(1, group)
        target = torch.where((first_of == ar) & ~gone & units.valid, ar, -1)
        red = Reduction.from_targets(target)
        return red, st.counts.to(target.device) - drop_cls  # what the tower kept

    def _saliency(self, units: layout.Units) -> Tensor:
        sal = self.saliency.take()
        if sal is None:
            raise self._error("the vision tower's feature-layer attention was not captured")
        if self.parts.layout == "anyres" and bool((units.frames > 1).any()):
            raise ValueError(
                "the vision tower's saliency of LLaVA-OneVision video frames is not supported "
                "(the frames are 2x2-pooled after the projector); reduce videos with a method "
                "that needs no saliency (random_proj, downsample_proj, m3_proj, dart, divprune, "
                "aim_merge)"
            )
        maps = self.saliency.per_image(sal)
        # one map per tower image: a LLaVA-1.5 clip was encoded frame by frame, every other
        # unit (an AnyRes image with its tiles, a Qwen2-VL image or video) as one entry
        towers = units.frames if self.parts.layout == "grid" else torch.ones_like(units.frames)
        if len(maps) != int(towers.sum()):
            raise self._error(f"{len(maps)} saliency maps for {int(towers.sum())} images")
        out = torch.zeros(units.valid.shape, dtype=sal.dtype, device=sal.device)
        first = 0
        for j, count in enumerate(towers.tolist()):  # a clip's frames, one after another
            m = torch.cat(maps[first : first + count])
            out[j, : m.shape[0]] = m
            first += count
        return out

    def _reduce_units(
        self, run: _Forward, x: Tensor, units: layout.Units
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Reduce every image and splice the results back: ``(hidden, rep, valid, virtual)``
        (``virtual``: with VTU, the slot each input position belongs to)."""
        method = self.projector
        if method is None:
            v = self._visual(run, x, units, frozenset())
            red, want = self._tower_groups(units)
            exact = True
        else:
            if method.video_only and bool((units.frames == 1).any()):
                raise ValueError(
                    f"{method.name} reduces video clips only, and this input holds "
                    f"{int((units.frames == 1).sum())} image(s): reduce images with an image "
                    "method (random_proj, downsample_proj, ...)"
                )
            v = self._visual(run, x, units, method.visual_needs)
            cand = v.candidates
            keep = method.keep_count(cand.sum(1))
            red = method.select(v, keep)
            want = keep + v.protected.sum(1)
            exact = method.exact_counts
        out, size = red.apply(v.x, v.valid.to(x.dtype))
        ok = size > 0
        pos = units.index.gather(1, red.rep)
        got = ok.sum(1)
        if exact:
            bad = got != want
            msg = "images kept {} tokens, scheduled {}"
        else:  # a pooling grid sets the count: it must still reduce
            want = v.valid.sum(1)
            bad = (got >= want) & (keep < v.candidates.sum(1))
            msg = "images kept {} tokens of {}: nothing was reduced"
        run.checks.append((~bad.any(), lambda: msg.format(got.tolist(), want.tolist())))
        # every kept token as (sample, original position): text first, then the images' outputs
        b, n, c = x.shape
        text = run.valid & ~run.span_input
        ar = torch.arange(n, device=x.device)
        all_x = torch.cat([x.reshape(b * n, c), out.reshape(-1, c)])
        all_s = torch.cat(
            [
                torch.arange(b, device=x.device).repeat_interleave(n),
                units.sample.repeat_interleave(pos.shape[1]),
            ]
        )
        all_p = torch.cat([ar.repeat(b), pos.reshape(-1)])
        all_ok = torch.cat([text.reshape(-1), ok.reshape(-1)])
        keys = (all_s * (n + 1) + all_p).masked_fill(~all_ok, b * (n + 1))
        order = keys.argsort(stable=True)[: int(all_ok.sum())]
        s, p = all_s[order], all_p[order]
        count = torch.bincount(s, minlength=b)
        length = int(count.max())
        first = torch.cumsum(count, 0) - count
        rank = torch.arange(order.shape[0], device=x.device) - first[s]
        slot = length - count[s] + rank  # right-aligned: padding on the left, as tokenizers do
        y = x.new_zeros(b, length, c)
        y[s, slot] = all_x[order]
        rep = torch.zeros(b, length, dtype=torch.long, device=x.device)
        rep[s, slot] = p + run.seen
        valid = torch.zeros(b, length, dtype=torch.bool, device=x.device)
        valid[s, slot] = True
        virtual = None
        if method is not None and method.vtu:
            entry_slot = torch.full_like(all_s, length)  # not kept -> the spare slot
            entry_slot[order] = slot
            virtual = self._virtual(run, units, red, entry_slot, n)
        return y, rep, valid, virtual

    def _virtual(
        self, run: _Forward, units: layout.Units, red: Reduction, entry_slot: Tensor, n: int
    ) -> Tensor:
        """``[B, n]``: the stream slot of every input position (VTU's ``m(j)``). Text and
        protected tokens are their own slot; an image token the slot of the merged token that
        took most of it; padding the spare slot past the end."""
        b = run.valid.shape[0]
        u, t = units.valid.shape
        m = red.rep.shape[1]
        out, taken = red.destination()  # [U, t] output of each unit token
        dropped = units.valid & ~taken
        if bool(dropped.any()):
            raise ValueError(
                f"{self.projector.name} with vtu=True dropped {int(dropped.sum())} image tokens: "
                "virtual unmerging needs every token merged into a kept one (use a merging "
                "method: aim_merge, m3_proj, downsample_proj, visionzip_proj, recoverable)"
            )
        virtual = entry_slot[: b * n].view(b, n).clone()
        unit_entry = b * n + torch.arange(u, device=out.device)[:, None] * m + out
        img = units.valid & ~units.protected
        virtual[units.sample[:, None].expand(u, t)[img], units.index[img]] = entry_slot[
            unit_entry[img]
        ]
        return virtual
