"""The hf-decoder adapter across transformers versions, and its run-time self-check.

Runs unchanged on the pinned and the newest transformers (5.23 takes ``past_key_values=``,
5.24 renamed it ``cache=``). Framework changes that would bypass the hooks are simulated on
whatever version is installed: a base model that swaps the cache for its own, an attention
that takes its cache under another name, a missing hook, a late cache write. Each must raise
``ReductionNotApplied`` naming the site, the method and the installed versions; a zero budget
never raises and stays bit-identical.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings

import numpy as np
import pytest
import torch
import transformers
from test_llm import batch, tiny
from transformers.cache_utils import DynamicCache

import tokenmerge as tm
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.adapters.base import ReductionNotApplied
from tokenmerge.methods import get_method
from tokenmerge.methods.decoder import DECODER_METHODS
from tokenmerge.methods.kv import KV_SCORERS

VERSION = f"transformers {transformers.__version__}"


def _ids(n: int = 40, b: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, 100, (b, n), generator=torch.Generator().manual_seed(seed))


def _decoder(name: str, ratio: float = 0.5, layer: int = 1):
    """A decoder method reducing from ``layer`` on (AIM: at ``layer`` and the next one)."""
    if name == "aim_prune":
        return get_method(name, ratio=ratio, start=layer, end=layer + 1, span=(1, -1))
    return get_method(name, ratio=ratio, layer=layer, span=(1, -1))


def _expect_not_applied(site: str, method: str):
    """The error names the site, the method and the installed transformers version."""
    want = "".join(rf"(?=.*{re.escape(w)})" for w in (f"'{site}' site", f"'{method}'", VERSION))
    return pytest.raises(ReductionNotApplied, match=f"(?s){want}")


def _remove_hook(module: torch.nn.Module, kind: str, owner: str) -> None:
    """Remove tokenmerge's hook (defined in ``_Runtime.<owner>``) from ``module``."""
    hooks = module._forward_hooks if kind == "post" else module._forward_pre_hooks
    ours = [k for k, h in hooks.items() if f"_Runtime.{owner}" in getattr(h, "__qualname__", "")]
    assert len(ours) == 1
    del hooks[ours[0]]


# --------------------------------------------------------------------------------------------
# The cache argument: read from the signatures, either name accepted
# --------------------------------------------------------------------------------------------


def test_cache_argument_names_come_from_the_signatures():
    model = tiny("llama")
    with tm.patched(model, get_method("snapkv", ratio=0.5)):
        rt = hd.runtime_of(model)
        for sig, module in ((rt.model_sig, model.model), (rt.attn_sig, rt.attns[0])):
            params = inspect.signature(type(module).forward).parameters
            want = "cache" if "cache" in params else "past_key_values"
            assert sig.cache == want and rt.cache_arg == want


@pytest.mark.parametrize("name", KV_SCORERS)
@torch.no_grad()
def test_kv_methods_evict_on_the_installed_transformers(name):
    """The 5.24 failure: the base model ignored the cache the hook passed and evicted
    nothing, silently."""
    model = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name on our side
        with tm.patched(model, get_method(name, ratio=0.5)):
            out = model(input_ids=_ids(), use_cache=True)
    cache = hd.cache_of(out)
    assert type(cache) is hd.ReducedCache
    held = [int((cache.index[i] >= 0).sum()) for i in range(4)]  # entries, over the heads
    assert sum(held) == 4 * model.config.num_key_value_heads * 20
    if not get_method(name, ratio=0.5).shares_layers:  # else layers hold different numbers
        assert [cache.stored(i) for i in range(4)] == [20] * 4


@torch.no_grad()
def test_a_kv_method_without_a_cache_is_refused_not_run_unreduced():
    model = tiny("llama")
    ref = model(input_ids=_ids(), use_cache=False).logits
    bad = pytest.raises(ValueError, match="use_cache=False: there is no cache to compress")
    with tm.patched(model, get_method("snapkv", ratio=0.5)), bad:
        model(input_ids=_ids(), use_cache=False)
    with tm.patched(model, get_method("snapkv", ratio=0.0)):  # nothing to compress: runs
        assert torch.equal(model(input_ids=_ids(), use_cache=False).logits, ref)


@pytest.mark.parametrize("name", DECODER_METHODS)
@torch.no_grad()
def test_decoder_methods_reduce_on_the_installed_transformers(name):
    model = tiny("llama")
    with tm.patched(model, _decoder(name)):
        out = model(input_ids=_ids(), use_cache=True)
        counts = [int(c) for c in hd.runtime_of(model).last.tokens_per_layer]
    assert counts[0] == 40 and counts[1] < 40 and out.logits.shape[1] == counts[-1]
    assert hd.cache_of(out).stored(1) == counts[1]


@torch.no_grad()
def test_a_cache_is_accepted_under_either_name():
    model = tiny("llama")
    ids, cont = _ids(40), _ids(5, seed=3)
    ref = model(torch.cat([ids, cont], 1)).logits[:, -5:]
    with tm.patched(model, get_method("snapkv", ratio=0.0)):  # identity: exact continuation
        logits = []
        for name in hd.CACHE_NAMES:
            cache = hd.cache_of(model(ids, use_cache=True))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the old name, on 5.24
                out = model(cont, **{name: cache})
            assert hd.cache_of(out) is cache and cache.get_seq_length() == 45
            logits.append(out.logits)
    for got in logits:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the base model takes both names too (its hook sees them before any deprecation shim)
    base = model.model
    with tm.patched(base, get_method("knorm", ratio=0.5)):
        for name in hd.CACHE_NAMES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out = base(ids, use_cache=True, **{name: None})
            assert type(hd.cache_of(out)) is hd.ReducedCache and hd.cache_of(out).stored(0) == 20
        c1, c2 = DynamicCache(config=base.config), DynamicCache(config=base.config)
        with pytest.raises(ValueError, match="two different caches"):
            base(ids, use_cache=True, cache=c1, past_key_values=c2)


@torch.no_grad()
def test_positional_arguments_of_the_base_model_are_read():
    """``base(ids, mask)``: the mask passed by position marks the padding (it was ignored)."""
    base = tiny("llama").model
    ids, mask, _ = batch((40, 21))
    with tm.patched(base, get_method("knorm", ratio=0.5)):
        by_name = base(input_ids=ids, attention_mask=mask, use_cache=True)
        by_pos = base(ids, mask, use_cache=True)
    torch.testing.assert_close(by_pos.last_hidden_state, by_name.last_hidden_state)
    for i in range(4):
        assert torch.equal(hd.cache_of(by_pos).index[i], hd.cache_of(by_name).index[i])
        kept = hd.cache_of(by_pos).index[i][1]
        assert int((kept[kept >= 0] < 19).sum()) == 0  # sample 1's 19 pad slots are never kept


def test_a_forward_without_a_cache_argument_is_refused_by_name():
    class LlamaModel(transformers.LlamaModel):  # a future version with another name
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                    use_cache=None, kv_store=None, **kwargs):  # fmt: skip
            return super().forward(input_ids, attention_mask, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaModel._from_config(tiny("llama").config, attn_implementation="sdpa")
    with pytest.raises(tm.UnsupportedModelError, match=rf"LlamaModel\.forward.*{VERSION}"):
        tm.apply(model, get_method("snapkv", ratio=0.5))
    assert not hasattr(model, hd.ATTR)


# --------------------------------------------------------------------------------------------
# The self-check: framework changes that bypass the hooks raise
# --------------------------------------------------------------------------------------------


def _swap_cache_in(model):
    """Make the base model build its own DynamicCache whatever it is given (what 5.24's
    ``LlamaModel`` did with the ``past_key_values=`` the hook wrote)."""
    inner = model.model
    orig = inner.forward

    def forward(*args, **kwargs):
        for name in hd.CACHE_NAMES:
            kwargs.pop(name, None)
        kwargs[hd.cache_arg(inner)] = DynamicCache(config=inner.config)
        return orig(*args, **kwargs)

    inner.forward = forward
    return lambda: delattr(inner, "forward")


def _rename_attention_cache(model):
    """Every attention takes its cache under a name the adapter does not write."""
    restore = []
    name = hd.cache_arg(model.model.layers[0].self_attn)
    for layer in model.model.layers:
        attn = layer.self_attn
        orig = attn.forward

        def forward(*args, _orig=orig, **kwargs):
            kwargs["kv_store"] = kwargs.pop(name, None)
            return _orig(*args, **kwargs)

        attn.forward = forward
        restore.append(attn)
    return lambda: [delattr(a, "forward") for a in restore]


@pytest.mark.parametrize("bypass", [_swap_cache_in, _rename_attention_cache])
@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "fastv", "holitom_inner"])
@torch.no_grad()
def test_a_cache_the_framework_bypasses_raises(name, bypass):
    model = tiny("llama")
    ids = _ids()
    method = get_method(name, ratio=0.5) if name in KV_SCORERS else _decoder(name)
    site = "kv" if name in KV_SCORERS else "decoder"
    with tm.patched(model, method):
        undo = bypass(model)
        try:
            with _expect_not_applied(site, name), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(input_ids=ids, use_cache=True)
        finally:
            undo()
        # the failed forward left no state behind: the next one runs and reduces
        cache = hd.cache_of(model(input_ids=ids, use_cache=True))
        assert cache.reduced


@pytest.mark.parametrize("bypass", [_swap_cache_in, _rename_attention_cache])
@pytest.mark.parametrize("name", ["snapkv", "fastv"])
@torch.no_grad()
def test_a_zero_budget_never_raises_and_stays_identical(name, bypass):
    model = tiny("llama")
    ids, mask, _ = batch((40, 30))
    undo = bypass(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model(input_ids=ids, attention_mask=mask, use_cache=True).logits
            method = get_method(name, ratio=0.0) if name == "snapkv" else _decoder(name, 0.0)
            with tm.patched(model, method):
                out = model(input_ids=ids, attention_mask=mask, use_cache=True).logits
    finally:
        undo()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
@torch.no_grad()
def test_a_missing_attention_hook_raises_kv(name):
    model = tiny("llama")
    with tm.patched(model, get_method(name, ratio=0.5)):
        _remove_hook(hd.runtime_of(model).attns[2], "post", "attn_post")
        with _expect_not_applied("kv", name):
            model(input_ids=_ids(), use_cache=True)
        with _expect_not_applied("kv", name):  # chunked prefill goes through the same check
            hd.chunked_prefill(model, _ids(), chunk=16, budget=8)


@pytest.mark.parametrize("name", DECODER_METHODS)
@torch.no_grad()
def test_a_missing_hook_raises_decoder(name):
    model = tiny("llama")
    method = _decoder(name, layer=2)
    for module, kind, owner in (("attn", "post", "attn_post"), ("layer", "pre", "layer_pre")):
        with tm.patched(model, method):
            rt = hd.runtime_of(model)
            target = rt.attns[1] if module == "attn" else rt.layers[2]
            _remove_hook(target, kind, owner)
            for use_cache in (True, False):
                with _expect_not_applied("decoder", name):
                    model(input_ids=_ids(), use_cache=use_cache)


@torch.no_grad()
def test_a_late_cache_write_raises():
    """A layer that writes to the cache after its attention (after the eviction)."""
    model = tiny("llama")
    layer = model.model.layers[1]
    orig = layer.forward

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        cache = kwargs[hd.cache_arg(layer)]
        lay = cache.layers[1]
        lay.keys, lay.values = torch.cat([lay.keys, lay.keys[..., -1:, :]], 2), lay.values
        return out

    with tm.patched(model, get_method("knorm", ratio=0.5)):
        layer.forward = forward
        try:
            with _expect_not_applied("kv", "knorm"):
                model(input_ids=_ids(), use_cache=True)
        finally:
            del layer.forward


@pytest.mark.parametrize("name", ["fastv", "aim_prune"])
@torch.no_grad()
def test_token_counts_off_schedule_raise(name):
    """A reduction that removes fewer tokens than scheduled (one short)."""
    model = tiny("llama")
    method = _decoder(name)
    orig = method.reduce
    method.reduce = lambda sig, state, r, layer: orig(sig, state, r - 1, layer)
    with tm.patched(model, method), _expect_not_applied("decoder", name):
        model(input_ids=_ids())


@torch.no_grad()
def test_an_evicted_layer_over_budget_raises():
    """A KV method whose selection keeps more entries than its budget."""
    model = tiny("llama")
    method = get_method("knorm", ratio=0.5)
    orig = method.select
    method.select = lambda ctx, keep, forced=None: orig(ctx, keep + 1, forced)
    with tm.patched(model, method), _expect_not_applied("kv", "knorm"):
        model(input_ids=_ids(), use_cache=True)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

BAD = [True, False, 2.0, 0.5, math.nan, "8", torch.tensor(2.0), torch.tensor(True),
       np.float64(3.0), np.bool_(True)]  # fmt: skip


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "arg, value",
    [("chunk", v) for v in [*BAD, None, 0, -3, torch.tensor(0), torch.tensor([4, 4])]]
    + [("budget", v) for v in [*BAD, 0, -1, torch.tensor(0), torch.tensor([4, 0])]]
    + [("budget", v) for v in (torch.tensor([2.0, 2.0]), torch.tensor([True, True]))]
    + [("window", v) for v in [*BAD, None, -1, torch.tensor(-2)]],
    ids=repr,
)
@torch.no_grad()
def test_chunked_prefill_refuses_bad_sizes_before_any_forward(arg, value):
    model = tiny("llama", layers=2)
    calls, handle = _count_forwards(model)
    try:
        with tm.patched(model, get_method("knorm", ratio=0.5)):
            kw = {"chunk": 8, "budget": 12, "window": 2, arg: value}
            with pytest.raises((TypeError, ValueError), match=rf"^{arg} must be"):
                hd.chunked_prefill(model, _ids(b=2), **kw)
    finally:
        handle.remove()
    assert not calls


@torch.no_grad()
def test_chunked_prefill_accepts_every_integer_kind():
    model = tiny("llama", layers=2)
    ids = _ids(b=2)
    with tm.patched(model, get_method("knorm", ratio=0.5)):
        ref = hd.chunked_prefill(model, ids, chunk=8, budget=12, window=2)
        for chunk, budget, window in [
            (np.int64(8), np.int32(12), np.int64(2)),
            (torch.tensor(8), torch.tensor(12), torch.tensor(2)),
            (8, torch.tensor([12, 12]), 2),
            (8, torch.tensor([12]), 0),
        ]:
            got = hd.chunked_prefill(model, ids, chunk=chunk, budget=budget, window=window)
            assert [got.cache.stored(i) for i in range(2)] == [12, 12]
            if int(window) == 2:
                for i in range(2):
                    assert torch.equal(got.cache.index[i], ref.cache.index[i])
        per_sample = hd.chunked_prefill(model, ids, chunk=8, budget=torch.tensor([12, 6]))
        assert ((per_sample.cache.index[0] >= 0).sum(-1)[:, 0]).tolist() == [12, 6]


def _loss_reference(logits, labels, rep, valid):
    """Cross-entropy of ``logits[b, s]`` against ``labels[b, p_s + 1]``, averaged over the
    slots that hold a real token whose next position exists and is labelled."""
    terms = []
    n = labels.shape[1]
    for b in range(logits.shape[0]):
        for s in range(logits.shape[1]):
            p = int(rep[b, s])
            if not bool(valid[b, s]) or p + 1 >= n or int(labels[b, p + 1]) == -100:
                continue
            lp = torch.log_softmax(logits[b, s].double(), -1)
            terms.append(-float(lp[int(labels[b, p + 1])]))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("name", DECODER_METHODS)
@torch.no_grad()
def test_labels_with_a_shortening_decoder_method(name):
    model = tiny("llama")
    ids, mask, _ = batch((40, 29))
    labels = ids.masked_fill(mask == 0, -100)
    unpatched = model(input_ids=ids, attention_mask=mask, labels=labels)
    with tm.patched(model, _decoder(name, ratio=0.0)):  # ratio 0: the model's own loss, exactly
        same = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(same.loss, unpatched.loss) and torch.equal(same.logits, unpatched.logits)
    with tm.patched(model, _decoder(name)):
        plain = model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        last = hd.runtime_of(model).last
        assert out.logits.shape[1] < ids.shape[1]  # the sequence was shortened
        assert torch.equal(out.logits, plain.logits) and plain.loss is None
        want = _loss_reference(out.logits, labels, last.rep, last.valid)
        assert float(out.loss) == pytest.approx(want, rel=1e-5)
        # shift_labels given by the caller (at the original positions) are followed too
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        again = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
        assert torch.equal(again.loss, out.loss)
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=1)


@pytest.mark.parametrize("name", ["snapkv", "fastv", "aim_prune"])
@torch.no_grad()
def test_an_empty_batch_behaves_like_the_unpatched_model(name):
    model = tiny("llama")
    ids = torch.zeros(0, 24, dtype=torch.long)
    mask = torch.ones_like(ids)

    def outcome(fn):
        try:
            out = fn()
        except Exception as e:  # the outcome is compared, not hidden
            return type(e), str(e).splitlines()[0]
        return "ok", tuple(out.shape if isinstance(out, torch.Tensor) else out.logits.shape)

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)

    calls = {
        "forward": lambda: model(input_ids=ids, attention_mask=mask, use_cache=True),
        "generate": generate,
        "chunked": lambda: hd.chunked_prefill(model, ids, mask, chunk=8).logits,
    }
    ref = {k: outcome(f) for k, f in calls.items()}
    method = get_method(name, ratio=0.5) if name == "snapkv" else _decoder(name)
    with tm.patched(model, method):
        for k, f in calls.items():
            if k == "chunked" and name != "snapkv":
                continue  # chunked prefill refuses decoder methods
            assert outcome(f) == ref[k], k


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_torch_compile_matches_eager_with_a_kv_method():
    """``torch.compile(model)`` of a patched tiny Llama: same logits, same kept entries.

    Backend ``aot_eager`` (Dynamo + AOTAutograd, no Inductor code generation): the hooks'
    graph breaks give several small graphs, which Inductor compiles too slowly for a test on
    a 2-core machine; ``aot_eager`` checks that Dynamo traces the hooks correctly.
    """
    torch._dynamo.reset()
    model = tiny("llama", layers=2)
    ids, mask, _ = batch((24, 17), n=24)
    with tm.patched(model, get_method("snapkv", ratio=0.5)):
        eager = model(input_ids=ids, attention_mask=mask, use_cache=True)
        compiled = torch.compile(model, backend="aot_eager")
        got = compiled(input_ids=ids, attention_mask=mask, use_cache=True)
        torch.testing.assert_close(got.logits, eager.logits, atol=1e-5, rtol=1e-5)
        a, b = hd.cache_of(eager), hd.cache_of(got)
        assert type(b) is hd.ReducedCache and b.reduced
        for i in range(2):
            assert torch.equal(a.index[i], b.index[i])
            torch.testing.assert_close(a.layers[i].keys, b.layers[i].keys, atol=1e-5, rtol=0)
        # decoding on the compiled model continues the reduced cache like eager
        step = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        nxt = torch.full((2, 1), 7)
        e2 = model(input_ids=nxt, attention_mask=step, **hd.cache_kw(model, hd.fork_cache(a)))
        c2 = compiled(input_ids=nxt, attention_mask=step, **hd.cache_kw(model, hd.fork_cache(b)))
        torch.testing.assert_close(c2.logits, e2.logits, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@torch.no_grad()
def test_decoding_steps_add_no_graph_break():
    """Decoding (a padded batch on an identity patch, a reduced cache whose padding record is
    already resolved, the first step after an unpadded prefill) needs no data-dependent host
    read, so Dynamo traces it in one graph."""
    torch._dynamo.reset()
    model = tiny("llama", layers=2)
    ids, mask, _ = batch((24, 17), n=24)
    step = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    nxt = torch.full((2, 1), 7)
    for method in (get_method("snapkv", ratio=0.0), get_method("snapkv", ratio=0.5)):
        with tm.patched(model, method):
            cache = hd.cache_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
            assert cache.reduced == (method.ratio > 0)
            cache.holes  # noqa: B018 - resolved by an earlier decoding step (eager)
            kw = hd.cache_kw(model, cache)
            explained = torch._dynamo.explain(model)(input_ids=nxt, attention_mask=step, **kw)
            assert explained.graph_break_count == 0, explained.break_reasons
    # the first step after an unpadded KV prefill: every sample kept as many entries
    with tm.patched(model, get_method("snapkv", ratio=0.5)):
        cache = hd.cache_of(model(input_ids=ids[:1], use_cache=True))
        kw = hd.cache_kw(model, cache)
        explained = torch._dynamo.explain(model)(input_ids=nxt[:1], **kw)
        assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
