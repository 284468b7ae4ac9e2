"""The hooks of one patched decoder and the state of its forwards (see the package docstring).

Self-check. A forward that is scheduled to reduce (a KV method's eviction in a prefill, or a
decoder method's layer-K reduction) verifies, without extra forwards and with at most one device
sync at its end, that the reduction really happened: every decoder-layer and attention hook ran,
every attention layer wrote into the :class:`ReducedCache` the adapter passed and the model
returned that cache, every evicted layer holds no more entries than its budget, and the token
counts after layer K are the scheduled ones. Otherwise it raises
:class:`~tokenmerge.adapters.base.ReductionNotApplied` (naming the site, the method and the
installed framework versions) instead of returning unreduced results. Forwards with nothing
scheduled (ratio 0, decoding) are never checked and stay bit-identical.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ...core.state import Signals, TokenState
from ...methods.base import Method
from ...methods.decoder import DecoderMethod
from ...methods.kv import KVMethod
from ..base import ContextSlot, UnsupportedModelError, not_applied
from ..patch import Patch
from .cache import _SERVING, ReducedCache
from .compat import Signature, cache_of
from .forward import _OBSERVER, _PLAN, _Forward, _Outer, _Plan
from .kvsite import _KVSite
from .ops import _gather_seq, _hidden, _is_zero, _left_align, _project, _window_of

# --------------------------------------------------------------------------------------------
# The runtime: hooks of one patched model
# --------------------------------------------------------------------------------------------

#: arguments the hooks read or write, by module
MODEL_ARGS = ("input_ids", "attention_mask", "inputs_embeds", "use_cache")
LAYER_ARGS = ("hidden_states", "attention_mask", "position_embeddings")
ATTN_ARGS = ("hidden_states", "position_embeddings", "attention_mask")
CAUSAL_LM_ARGS = ("labels", "logits_to_keep")


class _Runtime(_KVSite):
    """The hooks of one patched model and the state of its forwards (a context variable).

    The argument names of the patched forwards are read from their signatures once, here, so
    that one runtime serves every supported transformers version (see :mod:`.compat`).
    """

    #: whether the runtime can tell decoder methods the video frame of each token
    knows_frames: bool = False

    def __init__(self, model: nn.Module, inner: nn.Module, layers: Sequence[nn.Module]) -> None:
        self.model = model
        self.inner = inner
        self.config = inner.config
        self.layers = list(layers)
        self.attns = [layer.self_attn for layer in self.layers]
        self.depth = len(self.layers)
        self.impl = self.config._attn_implementation
        self.windows = [_window_of(a, self.config) for a in self.attns]
        self.model_sig = Signature.of(inner, MODEL_ARGS)
        self.layer_sig = Signature.of(self.layers[0], LAYER_ARGS)
        self.attn_sig = Signature.of(self.attns[0], ATTN_ARGS)
        self.outer_sig = Signature.of(model, CAUSAL_LM_ARGS) if model is not inner else None
        self.method: Method | None = None
        # per-forward state: a ContextVar when eager, an attribute while torch.compile traces
        self._fwd = ContextSlot(f"tokenmerge_fwd_{id(self)}")  # the base model forward (_Forward)
        self._last = ContextSlot(f"tokenmerge_last_{id(self)}")  # the latest one, for inspection
        self._outer = ContextSlot(f"tokenmerge_outer_{id(self)}")  # the causal-LM call (_Outer)

    def bind(self, patch: Patch) -> _Runtime:
        method = patch.method
        if isinstance(method, KVMethod):
            method.check_depth(self.depth)
        elif isinstance(method, DecoderMethod):
            method.schedule(self.depth)  # validates the layers
            if method.needs_frames and not self.knows_frames:
                raise UnsupportedModelError(
                    f"{method.name} merges the tokens of adjacent video frames: apply it to a "
                    "vision-language model given a video (the hf-vlm adapter: LLaVA, "
                    "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL), not to a text LLM"
                )
        self.method = method
        patch.slots += [self._fwd, self._last, self._outer]  # cleared by tm.remove
        return self

    @property
    def cache_arg(self) -> str:
        """The name under which the patched model takes its cache (``cache`` or
        ``past_key_values``, depending on the transformers version)."""
        sig = self.outer_sig or self.model_sig
        assert sig.cache is not None
        return sig.cache

    # -------------------------------------------------------------- properties
    @property
    def kv(self) -> KVMethod | None:
        return self.method if isinstance(self.method, KVMethod) else None

    @property
    def decoder(self) -> DecoderMethod | None:
        return self.method if isinstance(self.method, DecoderMethod) else None

    @property
    def last(self) -> _Forward | None:
        """State of the latest forward in this context (for inspection and tests)."""
        return self._last.get()

    def _shortens(self) -> bool:
        """The method shortens the hidden sequence (so the loss is computed here)."""
        dec = self.decoder
        return dec is not None and not dec.is_identity

    def _may_reduce(self) -> bool:
        m = self.method
        return m is not None and not getattr(m, "is_identity", True)

    def _error(self, what: str) -> Exception:
        assert self.method is not None
        return not_applied(self.method.site, self.method, what)

    # -------------------------------------------------------------- causal-LM hooks
    def outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        outer = _Outer()
        if self._shortens():
            if args:
                kwargs, args = self.outer_sig.bind(args, kwargs), ()
            if kwargs.get("labels") is not None:
                self._take_labels(module, outer, kwargs)
        self._outer.set(outer)  # a model's forward is not re-entrant: no nesting to keep
        return args, kwargs

    def _take_labels(self, module: nn.Module, outer: _Outer, kwargs: dict) -> None:
        """The decoder site shortens the sequence: the loss is computed here, on the kept
        positions (:meth:`_loss`), instead of by the model on logits it no longer matches."""
        name = f"{type(module).__name__} patched with {self.method.name}"
        if not _is_zero(kwargs.get("logits_to_keep")):
            raise ValueError(
                f"{name}: labels= with logits_to_keep= is not supported (the loss needs the "
                "logits of every kept position); pass one or the other"
            )
        if kwargs.get("return_dict") is False:
            raise ValueError(f"{name}: labels= needs return_dict=True (the default)")
        if "shift_labels" not in inspect.signature(module.loss_function).parameters:
            raise ValueError(
                f"{name}: its loss_function takes no shift_labels, so the loss on the kept "
                "positions cannot be computed; drop labels= and compute it from the logits"
            )
        outer.labels = kwargs.pop("labels")
        outer.loss_kw = {k: v for k, v in kwargs.items() if k not in self.outer_sig.names}

    def outer_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        outer = self._outer.get()
        if outer is None:
            return output
        self._outer.set(None)
        if outer.run is None and self._may_reduce():
            raise self._error(
                f"the hooks on {type(self.inner).__name__} never ran during the "
                f"{type(module).__name__} forward"
            )
        if outer.labels is not None:
            output = self._loss(module, outer, output)
        return output

    def _loss(self, module: nn.Module, outer: _Outer, output: Any) -> Any:
        """Next-token loss on the kept positions: slot ``s`` at original position ``p_s``
        predicts the label of position ``p_s + 1`` (kept or not); padding slots are ignored.
        Computed by the model's own ``loss_function`` with ``shift_labels``."""
        if not isinstance(output, Mapping) or output.get("logits") is None:
            raise ValueError(f"{type(module).__name__}: cannot attach a loss to {type(output)}")
        logits = output["logits"]
        labels = outer.labels.to(logits.device)
        loss_kw = dict(outer.loss_kw)
        shift = loss_kw.pop("shift_labels", None)  # the caller's, at the original positions
        if shift is None:
            shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        shift = shift.to(logits.device)
        run = outer.run
        if run is not None and (run.hidden_reduced or run.virtual is not None):
            slot = (run.rep - run.seen).clamp(0, shift.shape[1] - 1)
            shift = shift.gather(1, slot).masked_fill(~run.valid, -100)
        # else nothing was reduced: exactly the model's own shift
        loss = module.loss_function(
            logits=logits,
            labels=labels,
            vocab_size=module.config.get_text_config().vocab_size,
            shift_labels=shift.contiguous(),
            **loss_kw,
        )
        fields = {k: v for k, v in output.items() if k != "loss"}
        return type(output)(loss=loss, **fields)

    # -------------------------------------------------------------- base model hooks
    def model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = self.model_sig
        if args:  # positional arguments, by name (the mask may be one of them)
            kwargs, args = sig.bind(args, kwargs), ()
        passed = sig.take_cache(kwargs)  # either name -> the canonical one only
        ids = kwargs.get("input_ids")
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            return args, kwargs
        b, q = ref.shape[0], ref.shape[1]
        device = ref.device
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        cache = passed
        seen = cache.get_seq_length() if cache is not None else 0
        kv = self.kv
        if cache is None and not use_cache and kv is not None and not kv.is_identity:
            raise ValueError(
                f"{type(kv).__name__} compresses the KV cache, but this forward runs with "
                "use_cache=False: there is no cache to compress, and its output would be the "
                "unreduced model's. Pass use_cache=True (generate does), or call "
                "tokenmerge.remove(model) for forwards without a cache"
            )
        if cache is None and use_cache:
            cache = ReducedCache(config=self.config)
        elif type(cache) is DynamicCache and cache.get_seq_length() == 0:
            cache = ReducedCache(config=self.config)  # generate's fresh cache
        if cache is not None and not isinstance(cache, ReducedCache):
            if not self._may_reduce() or (isinstance(cache, DynamicCache) and seen > 0):
                cache = None  # nothing to reduce, or a cache prefilled elsewhere: run as is
            else:
                raise UnsupportedModelError(
                    f"{type(cache).__name__} is not supported by the hf-decoder adapter; use a "
                    "DynamicCache (the default) or tokenmerge's ReducedCache"
                )
        if cache is not None and cache is not passed:
            kwargs[sig.cache] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            if self._may_reduce() or (cache is not None and cache.reduced):
                raise ValueError(
                    "the hf-decoder adapter needs a 2-D attention_mask (or none); "
                    f"got a {mask.dim()}-D mask"
                )
            mask = None
        new_valid = (
            mask[:, -q:].to(device=device, dtype=torch.bool)
            if mask is not None
            else torch.ones(b, q, dtype=torch.bool, device=device)
        )
        if cache is not None:
            have = 0 if cache.orig_valid is None else cache.orig_valid.shape[1]
            old = cache.orig_valid
            if have < seen:  # tokens written while unpatched: assume real
                fill = torch.ones(b, seen - have, dtype=torch.bool, device=device)
                old = fill if old is None else torch.cat([old, fill], 1)
            cache.orig_valid = new_valid if old is None else torch.cat([old, new_valid], 1)
            if mask is not None:
                cache.note_valid(new_valid)
        fresh = seen == 0
        plan = _PLAN.get()
        if plan is None and fresh and kv is not None and not kv.is_identity:
            plan = _Plan(evict=True)
        elif plan is None and kv is not None and kv.decode_evict and cache is not None:
            # TOVA: hold every layer at the size its prefill left (none: nothing to hold)
            plan = _Plan(evict=True, caps=cache.budgets) if cache.budgets else None
        own = cache is not None and cache.reduced
        # decoding one token: whether every stored entry is real, resolved once, here
        holes = True
        if own and q == 1:
            holes = bool(cache.hole_flag())  # the one device sync of a decoding step
            cache.holes = holes
        run = _Forward(
            cache=cache,
            fresh=fresh,
            seen=seen,
            rep=torch.arange(seen, seen + q, device=device).expand(b, q),
            valid=new_valid,
            input_valid=new_valid,
            plan=plan if kv is not None or _OBSERVER.get() is not None else None,
            own_masks=own,
            padded=mask is not None,
            holes=holes,
        )
        run.evicts = (
            kv is not None
            and cache is not None
            and plan is not None
            and plan.evict
            and (plan.caps is not None or not kv.is_identity)
        )
        if cache is not None:
            run.writes = run.writes0 = cache.writes
            cache.incoming = q  # counted as seen even if layer 0 stores fewer (projector site)
        if run.evicts and kv.reconstructs and plan.caps is None:
            run.inputs = (ids, emb)  # the context its forwards after the prefill repeat
            run.position_ids = kwargs.get("position_ids")
        if fresh:
            self._schedule(run)
        if own and kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = None  # HF's own mask would index the stored entries wrongly
        outer = self._outer.get()
        if outer is not None:
            outer.run = run
        self._fwd.set(run)
        run.serve_prev, run.serving = _SERVING.get(), True
        _SERVING.set(cache)
        return args, kwargs

    def model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        run = self._fwd.get()
        if run is None:
            return output
        self._release(run)
        cache = run.cache
        if run.deferred:
            from .reconstruct import score_by_reconstruction

            score_by_reconstruction(self, run)
            self._last.set(run)  # the prefill, not its nested scoring forwards
        if cache is not None:
            # sliding layers trim from the front: keep their index tables aligned
            for i, idx in list(cache.index.items()):
                n = cache.stored(i)
                if idx.shape[-1] != n:
                    cache.index[i] = idx[..., -n:] if n else idx[..., :0]
            cache.peak_bytes = max(cache.peak_bytes, cache.nbytes)
        if run.checked:
            problem = self._verify(run, output)
            if problem is not None:
                raise self._error(problem)
        return output

    def _schedule(self, run: _Forward) -> None:
        """Schedule the layer-K reduction of a prefill (``run.schedule``, ``run.span_count``)."""
        dec = self.decoder
        if dec is not None and not dec.is_identity:
            run.schedule = dict(dec.schedule(self.depth))
            run.span_count = self._span(run).sum(1)

    def _span(self, run: _Forward) -> Tensor:
        """``[B, n]`` the current slots of a prefill that a decoder method may reduce: its
        ``span``, a slice over each sample's real tokens, or the input tokens the adapter
        marked (``run.span_input``: a VLM's image tokens)."""
        if run.span_input is not None:
            sel = (run.rep - run.seen).clamp(0, run.span_input.shape[1] - 1)
            return run.span_input.gather(1, sel) & run.valid
        pos_table = run.input_valid.long().cumsum(1) - 1
        pos = pos_table.gather(1, run.rep.clamp(0, pos_table.shape[1] - 1))
        return self.decoder.span_mask(pos, run.input_valid.sum(1)) & run.valid

    def _release(self, run: _Forward) -> None:
        """End ``run``: the cache is no longer served, the state becomes :attr:`last`."""
        if run.serving:
            _SERVING.set(run.serve_prev)
            run.serving, run.serve_prev = False, None
        run.signals.clear()
        run.pe_cache.clear()
        self._last.set(run)
        self._fwd.set(None)

    def _fail(self, run: _Forward, what: str) -> Exception:
        """The error of a failed check inside the forward (the forward's state is released)."""
        self._release(run)
        return self._error(what)

    def _verify(self, run: _Forward, output: Any) -> str | None:
        """What did not happen of what ``run`` scheduled (``None``: everything did)."""
        depth = self.depth
        if len(run.attn_ran) != depth:
            missing = sorted(set(range(depth)) - set(run.attn_ran))
            return f"the attention hooks of layers {missing} never ran"
        if len(run.layers_ran) != depth:
            missing = sorted(set(range(depth)) - set(run.layers_ran))
            return f"the decoder-layer hooks of layers {missing} never ran"
        missed = sorted(set(run.schedule) - run.done)
        if missed:
            return f"the reduction scheduled before layers {missed} never ran"
        cache = run.cache
        if cache is not None:
            out = cache_of(output)
            if out is not None and out is not cache:
                return (
                    f"the model returned a {type(out).__name__}, not the ReducedCache passed to "
                    f"it as {self.model_sig.cache}="
                )
            wrote = cache.writes - run.writes0
            if wrote != depth:
                return f"{wrote} of {depth} attention layers wrote to tokenmerge's ReducedCache"
            for i, kept in run.evicted.items():
                n = cache.stored(i)
                if n > kept:
                    return f"layer {i} holds {n} cache entries after its eviction to {kept}"
        if run.hidden_reduced and isinstance(output, Mapping):
            h = output.get("last_hidden_state")
            if h is not None and h.shape[1] != run.rep.shape[1]:
                return (
                    f"the model's output has {h.shape[1]} positions, not the {run.rep.shape[1]} "
                    "slots kept"
                )
        if run.checks:  # one device sync for all of them
            ok = torch.stack([c.reshape(()) for c, _ in run.checks])
            if not bool(ok.all()):
                return run.checks[int((~ok).nonzero()[0, 0])][1]()
        return None

    # -------------------------------------------------------------- decoder layer hook
    def layer_pre(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            run = self._fwd.get()
            if run is None:
                return args, kwargs
            run.layers_ran.append(i)
            if i in run.schedule:
                args, kwargs = self._reduce_hidden(i, run, args, kwargs)
            if run.hidden_reduced:
                pe = kwargs.get("position_embeddings")
                if pe is not None:
                    key = id(pe[0])
                    if key not in run.pe_cache:
                        run.pe_cache[key] = (
                            _gather_seq(pe[0], run.sel),
                            _gather_seq(pe[1], run.sel),
                        )
                    kwargs["position_embeddings"] = run.pe_cache[key]
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], run.sel)
            if run.own_masks or run.hidden_reduced:
                kwargs["attention_mask"] = self._mask(i, run)
            return args, kwargs

        return hook

    def _mask(self, i: int, run: _Forward) -> Tensor | None:
        """The attention mask of layer ``i`` over what its cache stores plus the new slots."""
        cache = run.cache
        q_idx, q_ok = run.rep[:, None], run.valid[:, None]  # [B, 1, n]
        k_idx, k_ok = q_idx, q_ok
        if q_idx.shape[2] == 1 and self.windows[i] is None and (cache is None or not run.holes):
            return None  # decoding one token that may see every stored entry
        heads = 1
        if cache is not None:
            past = cache.layer_index(i, seen=run.seen)
            if past is not None:
                # one mask for all heads, or one per head when they hold different entries
                p = past if i in cache.ragged else past[:, :1]
                heads = p.shape[1]
                k_idx = torch.cat([p, q_idx.expand(-1, heads, -1)], 2)
                k_ok = torch.cat([cache.valid_of(p), q_ok.expand(-1, heads, -1)], 2)
        window = self.windows[i]
        q_col = q_idx[:, :, :, None]
        allowed = k_ok[:, :, None, :] & (k_idx[:, :, None, :] <= q_col)  # [B, h, n, K]
        if window is not None:
            allowed &= (q_col - k_idx[:, :, None, :]) < window
        if heads > 1:
            allowed = allowed.repeat_interleave(self.attns[i].num_key_value_groups, dim=1)
        if self.impl == "eager":
            dtype = self.inner.dtype if hasattr(self.inner, "dtype") else torch.float32
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)
        return allowed

    def _reduce_hidden(self, i: int, run: _Forward, args: tuple, kwargs: dict) -> tuple:
        method = self.decoder
        run.done.add(i)
        x = _hidden(args, kwargs)
        sig = run.signals.pop(i, None)
        if sig is None and not method.scored(i):
            sig = Signals(x=x, k=None)  # this step reads the hidden states only
        if sig is None:
            what = f"layer {i - 1}'s attention hook never ran (no scores for layer {i})"
            raise self._fail(run, what)
        lengths = run.input_valid.sum(1)
        in_span = self._span(run)
        target = torch.round(run.span_count.double() * run.schedule[i]).long()
        r = (in_span.sum(1) - target).clamp_min(0)
        r = torch.where(lengths < method.min_tokens, torch.zeros_like(r), r)
        sig.x = x
        if method.needs_frames:
            sig.cell = self._cells(run, i, x)
        state = TokenState.start(x, run.valid & ~in_span, size=run.valid.to(x.dtype))
        red = method.reduce(sig, state, r, i)  # None when r removes nothing (it checks, once)
        if red is None:
            run.checks.append(
                (
                    (r == 0).all(),
                    lambda: (
                        f"{method.name} returned no reduction before layer {i}, scheduled "
                        f"to remove {r.tolist()} tokens"
                    ),
                )
            )
            return args, kwargs
        want = run.valid.sum(1) - r
        y, size = red.apply(x, state.size)
        rep = run.rep.gather(1, red.rep)
        valid = size > 0
        perm = _left_align(valid)
        y = _gather_seq(y, perm)
        rep = rep.gather(1, perm)
        valid = valid.gather(1, perm)
        rep = torch.where(valid, rep, torch.zeros_like(rep))
        got = valid.sum(1)
        if method.exact(i):
            ok, scheduled = (got == want).all(), "scheduled"
        else:  # may remove fewer, never more
            ok, scheduled = ((got >= want) & (got <= run.valid.sum(1))).all(), "scheduled >="
        run.checks.append(
            (ok, lambda: f"layer {i} runs on {got.tolist()} tokens, {scheduled} {want.tolist()}")
        )
        return self._continue_on(run, y, rep, valid, args, kwargs)

    def _cells(self, run: _Forward, i: int, x: Tensor) -> Tensor:
        """``[B, n]`` :attr:`Signals.cell` of the current slots (refused at bind time here:
        only the VLM runtime knows frames)."""
        raise self._fail(run, "this runtime does not know the video frames of its tokens")

    def _continue_on(
        self,
        run: _Forward,
        y: Tensor,
        rep: Tensor,
        valid: Tensor,
        args: tuple,
        kwargs: dict,
        stored: bool = True,
    ) -> tuple[tuple, dict]:
        """The layer's arguments with the reduced hidden states ``y`` (slots with original
        index ``rep``, real where ``valid``). ``stored=False`` (virtual unmerging): attention
        and the cache keep working on every original position."""
        run.rep, run.valid, run.padded = rep, valid, True
        if stored:
            if run.cache is not None:
                run.cache.note_valid(valid)  # layers from here on store these slots
            run.sel = (rep - run.seen).clamp_min(0)
            run.pe_cache.clear()
        if args:
            return (y, *args[1:]), kwargs
        kwargs["hidden_states"] = y
        return args, kwargs

    # -------------------------------------------------------------- attention hook
    def attn_post(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            run = self._fwd.get()
            if run is None:
                return output
            run.attn_ran.append(i)
            if run.hidden_reduced and _hidden(args, kwargs).shape[1] != run.rep.shape[1]:
                raise self._fail(
                    run,
                    f"layer {i}'s attention ran on {_hidden(args, kwargs).shape[1]} positions, "
                    f"not the {run.rep.shape[1]} slots kept",
                )
            if (i + 1) in run.schedule and self.decoder.scored(i + 1):
                run.signals[i + 1] = self._signals(module, run, kwargs)
            cache = run.cache
            if cache is not None:
                wrote, run.writes = cache.writes != run.writes, cache.writes
                if wrote:
                    self._after_attention(i, module, run, kwargs)
                elif run.checked:
                    name = self.attn_sig.cache
                    given = kwargs.get(name)
                    got = (
                        f"the ReducedCache passed to it as {name}="
                        if given is cache
                        else f"tokenmerge's ReducedCache (it was given {type(given).__name__} as "
                        f"{name}=)"
                    )
                    raise self._fail(run, f"layer {i}'s attention did not write to {got}")
            run.tokens_per_layer.append(run.valid.sum(1))
            return output

        return hook

    def _signals(self, attn: nn.Module, run: _Forward, kwargs: dict) -> Signals:
        """Layer K-1's queries and keys (repeated to the query heads) for a decoder method."""
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        groups = attn.num_key_value_groups
        k = _project(attn, "k", h, cos, sin).repeat_interleave(groups, dim=1)
        ok = run.valid
        if self.decoder.query == "last":
            q = _project(attn, "q", h[:, -1:], cos[:, -1:], sin[:, -1:])
            bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~ok, -math.inf)[:, None, None, :]
        else:
            q = _project(attn, "q", h, cos, sin)
            allowed = ok[:, None, :] & (run.rep[:, None, :] <= run.rep[:, :, None])
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~allowed, -math.inf)[:, None]
        return Signals(x=h, k=k, q=q, scale=float(attn.scaling), bias=bias)
