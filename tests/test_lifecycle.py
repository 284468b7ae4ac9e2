"""Lifecycle and the block-site self-check (issue 9, classes 1 and 4).

Nested patches are refused naming both models; removal in any order restores every module
exactly; ``copy.deepcopy`` gives an independent patched copy; pickling says to remove first;
an empty batch works wherever the unpatched model works; a framework change that bypasses
the patched block forwards, or a method that removes fewer tokens than scheduled, raises
:class:`tokenmerge.ReductionNotApplied` instead of returning unreduced results.
"""

from __future__ import annotations

import copy
import io
import pickle
import types
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import transformers
from models import all_models, images, make

import tokenmerge as tm
from tokenmerge.core.reduction import Reduction
from tokenmerge.methods import REGISTRY
from tokenmerge.methods.tome import ToMe


def _snapshot(model: torch.nn.Module) -> list:
    """Every module's instance attributes and hooks: what a patch may touch."""
    out = []
    for name, m in model.named_modules():
        hooks = [
            tuple(getattr(m, h).values())
            for h in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs")
        ]
        out.append((name, sorted(vars(m)), hooks))
    return out


def _llama(layers: int = 2):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


# --------------------------------------------------------------------------------------------
# Nesting and removal order
# --------------------------------------------------------------------------------------------


def _pairs():
    vit = transformers.ViTForImageClassification._from_config(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, image_size=32, patch_size=4)
    ).eval()  # fmt: skip
    yield "hf-vit", vit, vit.vit, tm.ToMe(4)
    llama = _llama()
    yield "hf-decoder", llama, llama.model, tm.get_method("snapkv", ratio=0.5)


@pytest.mark.parametrize("inner_first", [False, True])
@pytest.mark.parametrize("case", ["hf-vit", "hf-decoder"])
def test_patching_a_parent_or_child_of_a_patched_module_is_refused(case, inner_first):
    _, outer, inner, method = next(p for p in _pairs() if p[0] == case)
    before = _snapshot(outer)
    first, second = (inner, outer) if inner_first else (outer, inner)
    tm.apply(first, method)
    with pytest.raises(ValueError) as err:
        tm.apply(second, method)
    msg = str(err.value)
    assert type(first).__name__ in msg and type(second).__name__ in msg
    assert "remove" in msg
    tm.remove(first)
    assert _snapshot(outer) == before


@torch.no_grad()
def test_independent_patches_in_one_tree_remove_in_any_order():
    a, run = make("timm-dinov2-like")
    b, _ = make("hf-dinov2-sdpa", seed=1)
    tree = torch.nn.ModuleDict({"a": a, "b": b})
    x = images(2)
    ref = (run(a, x), b(pixel_values=x).pooler_output)
    before = _snapshot(tree)
    for order in ((a, b), (b, a)):
        tm.apply(a, tm.ToMe(4))
        tm.apply(b, tm.get_method("pitome", r=4))
        for m in order:
            tm.remove(m)
        assert _snapshot(tree) == before
        assert torch.equal(run(a, x), ref[0])
        assert torch.equal(b(pixel_values=x).pooler_output, ref[1])


# --------------------------------------------------------------------------------------------
# deepcopy and pickle
# --------------------------------------------------------------------------------------------


@all_models
@torch.no_grad()
def test_deepcopy_gives_an_independent_patched_copy(name):
    model, run = make(name)
    x = images(2)
    tm.apply(model, tm.ToMe(4))
    out = run(model, x)
    before = _snapshot(model)
    clone = copy.deepcopy(model)
    assert _snapshot(model) == before  # the original is patched exactly as before
    assert tm.patch_of(clone) is not tm.patch_of(model)
    assert tm.patch_of(clone).model is clone
    assert torch.equal(run(clone, x), out)
    assert tm.state(clone) is not tm.state(model)
    for p in clone.parameters():  # the copy owns its weights
        p.add_(1.0)
    assert torch.equal(run(model, x), out)
    tm.remove(clone)
    assert torch.equal(run(model, x), out)  # the original is still patched
    assert tm.patch_of(model).method == tm.ToMe(4)


@torch.no_grad()
def test_deepcopy_of_a_patched_decoder_and_of_a_container():
    model = _llama()
    ids = torch.randint(1, 63, (1, 20))
    tm.apply(model, tm.get_method("snapkv", ratio=0.5))
    clone = copy.deepcopy(torch.nn.ModuleList([model]))[0]
    a = model(input_ids=ids, use_cache=True).logits
    b = clone(input_ids=ids, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert tm.patch_of(clone) is not tm.patch_of(model)


@pytest.mark.parametrize("name", ["timm-dinov2-like", "hf-vit-sdpa"])
def test_pickle_and_torch_save_say_to_remove_first(name):
    model, _ = make(name)
    tm.apply(model, tm.ToMe(4))
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"tokenmerge\.remove\(model\) first"):
            dump(model)
    with pytest.raises(TypeError, match="remove"):  # a patched block on its own, too
        pickle.dumps(tm.patch_of(model).target.blocks[0])
    torch.save(model.state_dict(), io.BytesIO())  # weights alone are fine
    tm.remove(model)
    assert pickle.loads(pickle.dumps(model)) is not None


# --------------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------------


def _like_unpatched(model, method, run):
    """The patched model does with ``run`` what the unpatched one does: the same output shape,
    or the same error where the framework itself cannot take the input."""
    try:
        ref = run(model)
    except RuntimeError as e:  # some HF attention reshapes cannot take an empty batch at all
        with tm.patched(model, method), pytest.raises(type(e)):
            run(model)
        return
    with tm.patched(model, method):
        assert run(model).shape == ref.shape


@all_models
@pytest.mark.parametrize("method", ["tome", "dtome", "gtp", "m3"])
@torch.no_grad()
def test_an_empty_batch_works_like_the_unpatched_model(name, method):
    model, run = make(name)
    x = images(2)[:0]
    _like_unpatched(model, REGISTRY[method].example(4), lambda m: run(m, x))


@pytest.mark.parametrize("name", ["bert-sdpa", "distilbert-eager"])
@torch.no_grad()
def test_an_empty_text_batch_works_like_the_unpatched_model(name):
    from test_text import make_text

    ids = torch.zeros(0, 12, dtype=torch.long)
    run = lambda m: m(input_ids=ids, attention_mask=ids).last_hidden_state  # noqa: E731
    _like_unpatched(make_text(name), tm.ToMe(r=tm.KeepRatio(0.8)), run)


# --------------------------------------------------------------------------------------------
# The block-site self-check
# --------------------------------------------------------------------------------------------


def _bypass_timm(model):
    """A 'framework change': forward_features calls the class forward of each block, which
    skips the instance forward tokenmerge installs."""

    def forward_features(self, x, **kwargs):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for blk in self.blocks:
            x = type(blk).forward(blk, x)
        return self.norm(x)

    model.forward_features = types.MethodType(forward_features, model)


def _bypass_hf(model):
    """The same for a transformers ViT: its layers are called through their class."""

    def forward(pixel_values, **kwargs):
        h = model.embeddings(pixel_values)
        for layer in model.layers:
            h = type(layer).forward(layer, h, None)
        h = model.layernorm(h)
        return transformers.modeling_outputs.BaseModelOutputWithPooling(
            last_hidden_state=h, pooler_output=model.pooler(h)
        )

    model.forward = forward


@pytest.mark.parametrize(
    "name, bypass, framework",
    [("timm-dinov2-like", _bypass_timm, "timm"), ("hf-vit-sdpa", _bypass_hf, "transformers")],
)
@torch.no_grad()
def test_bypassed_block_forwards_raise_naming_site_method_and_version(name, bypass, framework):
    model, run = make(name)
    bypass(model)
    x = images(2)
    with tm.patched(model, tm.ToMe(4)), pytest.raises(tm.ReductionNotApplied) as err:
        run(model, x)
    msg = str(err.value)
    version = __import__(framework).__version__
    assert "'block' site" in msg and "ToMe" in msg and f"{framework} {version}" in msg
    with tm.patched(model, tm.ToMe(0)):  # budget 0: nothing was meant to happen
        run(model, x)


@dataclass
class _ShortToMe(ToMe):
    """A broken method: it merges one token fewer than it was asked to."""

    name: ClassVar[str] = "short_tome"

    def reduce(self, sig, state, r, layer):
        return super().reduce(sig, state, r - 1, layer) if r > 1 else None


@pytest.mark.parametrize("name", ["timm-avgpool", "hf-siglip-eager"])
@torch.no_grad()
def test_counts_that_miss_the_schedule_raise(name):
    model, run = make(name)
    with tm.patched(model, _ShortToMe(r=4)), pytest.raises(tm.ReductionNotApplied) as err:
        run(model, images(2))
    assert "after block 0" in str(err.value) and "schedule leaves" in str(err.value)


def test_reduction_of_an_empty_batch_has_the_scheduled_width():
    from tokenmerge.adapters.block_tokens import empty_reduction as _empty_reduction

    red = _empty_reduction(10, 6, torch.device("cpu"))
    y, s = red.apply(torch.zeros(0, 10, 3))
    assert y.shape == (0, 6, 3) and s.shape == (0, 6) and isinstance(red, Reduction)


@torch.no_grad()
def test_removal_drops_the_last_forwards_state():
    """A context keeps a ContextVar's value as long as it lives: after tm.remove, no patch may
    still hold its last forward (a decoder's KV cache, a block patch's token state)."""
    import gc
    import weakref

    from tests.test_llm import batch, tiny
    from tokenmerge.adapters import hf_decoder as hd

    model = tiny("llama")
    ids, mask, _ = batch((40, 29))
    with tm.patched(model, tm.get_method("knorm", ratio=0.5)):
        cache = hd.cache_of(model(ids, attention_mask=mask, use_cache=True))
        rt = hd.runtime_of(model)
        assert rt.last is not None and rt.last.cache is cache  # inspectable while patched
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None and rt.last is None
