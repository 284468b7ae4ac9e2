"""The LLM bench's protocol on a tiny random Llama with a tiny chat-template tokenizer (no real
weights, no corpora): the chat-template split, the statistics, the shared recorded prefill
against the live patched prefill, the independent perplexity check, and a ``--quick`` CLI run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings

import pytest
import torch
import transformers

import tokenmerge as tm
from tokenmerge.adapters import hf_decoder as hd
from tokenmerge.eval import corpora
from tokenmerge.eval import llm as L
from tokenmerge.eval.report import provenance
from tokenmerge.methods.kv import KV_SCORERS

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: the synthetic corpus's vocabulary
WORDS = ("the", "whale", "sea", "ship", "captain", "harbour", "letter", "sister", "dinner",
         "garden", "rain", "house", "road", "friend", "voyage", "storm", "island")  # fmt: skip


def _text(seed: int = 0, paragraphs: int = 300) -> str:
    rng = random.Random(seed)
    paras = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 60))).capitalize() + "."
        for _ in range(paragraphs)
    ]
    return "\n\n".join(paras)


def chat_tokenizer(*texts: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` and the needle's prompts, with a
    ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([*texts, L.NEEDLE, L.QUESTION, L.ANSWER_PREFIX], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", chat_template=TEMPLATE
    )


@pytest.fixture(scope="module")
def tok():
    """The tokenizer of the synthetic text."""
    return chat_tokenizer(_text())


def tiny_lm(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        eos_token_id=1, pad_token_id=1, initializer_range=0.3,  # peaked, not uniform, logits
    )  # fmt: skip
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.fixture
def synthetic_corpora(monkeypatch):
    monkeypatch.setattr(corpora, "text", lambda name: _text(seed=len(name)))


def _cfg(**kw) -> L.LLMBenchConfig:
    small = {"snapkv": {"window": 8}, "expected_attention": {"window": 16, "future": 16},
             "kvzip": {"prompt": (5, 6, 7), "chunk": 32},
             "adakv": {"scorer_params": {"window": 8}}}  # fmt: skip
    base = dict(lengths=(96,), trials=2, continuation=32, window=4, chunk=32, method_params=small)
    return L.LLMBenchConfig(**(base | kw))


# --------------------------------------------------------------------------------------------
# Protocol pieces
# --------------------------------------------------------------------------------------------


def test_chat_template_split_puts_the_context_before_the_question(tok, synthetic_corpora):
    prefix, suffix = L.chat_split(tok)
    assert prefix == "<|im_start|>user\n"
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"
    t = L.make_trials(tok, [64], 3, ["austen", "jargon"], 16, seed=0)
    assert [round(x.depth, 2) for x in t] == [0.1, 0.5, 0.9]
    assert [x.corpus for x in t] == ["austen", "jargon", "austen"]
    ctx = tok.decode(t[0].context[0])
    assert ctx.startswith(prefix) and f"The pass key is {t[0].key}." in ctx
    assert "<|im_end|>" not in ctx  # the user turn is still open when compressed
    q = tok.decode(t[0].question[0])
    assert q == L.QUESTION + suffix + L.ANSWER_PREFIX
    # the haystack has the requested length: template prefix + needle on top
    extra = len(L.ids_of(tok, prefix)) + len(L.ids_of(tok, L.NEEDLE.format(key=t[0].key)))
    assert t[0].context.shape[1] == 64 + extra
    # no chat template: no prefix, a blank line before the answer
    tok2 = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert L.chat_split(tok2) == ("", "\n\n")


def test_standard_errors():
    assert L.proportion([True, False, True, True]) == (0.75, math.sqrt(0.75 * 0.25 / 4), 4)
    assert L.proportion([True] * 5) == (1.0, 0.0, 5)
    assert L.proportion([]) == (None, None, 0)
    # pooled ratio exp((Σnll - Σbase) / Σn); SE = ratio · stdev(per-trial log ratio) / sqrt(T)
    nll, base, n = [110.0, 100.0, 90.0], [100.0, 100.0, 100.0], [10, 10, 10]
    ratio, se = L.ppl_ratio(nll, n, base, n)
    assert ratio == pytest.approx(1.0)
    assert se == pytest.approx(1.0 * 1.0 / math.sqrt(3))  # per-trial: +1, 0, -1
    assert L.ppl_ratio([5.0], [10], [4.0], [10]) == (pytest.approx(math.exp(0.1)), None)


@pytest.mark.parametrize("name", KV_SCORERS)
@torch.no_grad()
def test_shared_recorded_prefill_equals_the_live_patched_prefill(tok, synthetic_corpora, name):
    """The runner records the context minus its tail, then the tail plus each mode's suffix;
    compressing that (KVzip: with scores reused across ratios) must give the cache a patched
    one-shot prefill of the whole sequence gives."""
    model = tiny_lm(len(tok))
    cfg = _cfg(methods=(name,), factors=(2.0, 4.0))
    cfg = L.bench.with_prompts(cfg, tok)
    r = L.Runner(cfg, model, tok, lambda k: None)
    assert r.tail < 96  # the prefill really is split
    trial = L.make_trials(tok, [96], 1, ["austen"], 32)[0]
    rec = r.record(trial)
    memo: dict = {}
    for f in cfg.factors:
        m = r.method(name, f)
        for mode, (_, _, ids) in rec.items():
            with tm.patched(model, m):
                live = hd.cache_of(model(input_ids=ids, use_cache=True))
                got = r.compress(rec[mode], m, memo)
            assert live.index and set(live.index) == set(got.index), (mode, f)
            for i in live.index:
                assert torch.equal(live.index[i], got.index[i]), (mode, f, i)
                torch.testing.assert_close(live.layers[i].keys, got.layers[i].keys)
    assert bool(memo) == m.reconstructs  # one reconstruction per mode, not per ratio


@torch.no_grad()
def test_perplexity_check_agrees_with_the_bench_on_a_tiny_model(tok, synthetic_corpora):
    model = tiny_lm(len(tok))
    methods = ("snapkv", "h2o", "tova", "kvzip", "adakv")
    cfg = L.bench.with_prompts(_cfg(methods=methods, factors=(2.0, 4.0), chunked=False), tok)
    r = L.Runner(cfg, model, tok, lambda k: None)
    trial = L.make_trials(tok, [96], 1, ["austen"], 32)[0]
    r.trial(trial, check=True)
    assert {c["method"] for c in r.checks} == {"uncompressed", *methods}
    assert len(r.checks) == 1 + 2 * len(methods) * 2  # agnostic and aware per config
    for c in r.checks:
        assert c["diff"] < 1e-4, c
    # a real compression changed the perplexity (the check is not comparing 1 with 1)
    assert max(abs(c["reference"] - 1.0) for c in r.checks) > 1e-3
    assert model.config._attn_implementation == "sdpa"  # restored
    assert not hasattr(model, hd.ATTR)


@torch.no_grad()
def test_agnostic_only_runs_no_query_aware_prefill(tok, synthetic_corpora):
    """``aware=False``: the agnostic figures are those of a full run, nothing aware is
    measured, and the report has no aware columns."""
    model = tiny_lm(len(tok))
    cfg = L.bench.with_prompts(_cfg(methods=("snapkv", "kvzip"), factors=(2.0,), trials=1), tok)
    trial = L.make_trials(tok, cfg.lengths, 1, cfg.corpora, cfg.continuation)[0]
    both = L.Runner(cfg, model, tok, lambda k: None)
    both.trial(trial, check=True)
    one = L.Runner(dataclasses.replace(cfg, aware=False), model, tok, lambda k: None)
    assert list(one.suffixes(trial)) == ["agnostic"]
    one.trial(trial, check=True)
    for k, a in both.accs.items():
        b = one.accs[k]
        assert (b.agnostic, b.answers, b.kv_final) == (a.agnostic, a.answers, a.kv_final)
        assert b.nll == pytest.approx(a.nll, rel=1e-6) and b.aware == b.nll_aware == []
    assert {c["mode"] for c in one.checks} == {"agnostic"} and one.checks
    result = L.summarize(one.cfg, one, [trial], None, 0, [])
    assert (
        result["rows"][0]["needle_aware"] is None and result["rows"][0]["ppl_ratio_aware"] is None
    )
    md = L.markdown(one.cfg, result, provenance(0))
    assert "needle (aware)" not in md and "ppl ratio (agnostic)" in md and "not run" in md
    # nothing timed: the scoring cost is stated at the trial's own length
    n = trial.context.shape[1]
    assert f"costs for a {n}-token context" in md
    kvzip = next(r for r in result["rows"] if r["method"] == "kvzip")
    assert kvzip["extra_forwards"] == one.method("kvzip", 2.0).extra_forwards(n) > 0


@torch.no_grad()
def test_workers_give_the_single_process_result(tok, synthetic_corpora, monkeypatch):
    """Trials shared by forked workers are merged back in trial order: the same answers,
    NLLs, sizes and checks as one process (up to the rounding of other thread counts)."""
    model = tiny_lm(len(tok))
    methods = ("snapkv", "kvzip", "tova")
    cfg = L.bench.with_prompts(_cfg(methods=methods, factors=(2.0,), trials=3), tok)
    trials = L.make_trials(tok, cfg.lengths, cfg.trials, cfg.corpora, cfg.continuation)
    ticks: list[int] = []
    one = L.Runner(cfg, model, tok, ticks.append)
    for i, t in enumerate(trials):
        one.trial(t, check=i == 1)
    two = L.Runner(cfg, model, tok, ticks.append)
    L.run_trials(two, trials, {1}, workers=2)
    assert sum(ticks) == 2 * sum(ticks[: len(ticks) // 2])  # every step reported once
    assert list(one.accs) != [] and sorted(one.accs) == sorted(two.accs)
    for a, b in [(one.base, two.base)] + [(one.accs[k], two.accs[k]) for k in one.accs]:
        assert len(a.agnostic) == 3
        for f in ("agnostic", "aware", "lengths", "answers", "tokens", "tokens_aware"):
            assert getattr(a, f) == getattr(b, f), f
        for f in ("nll", "nll_aware", "kv_final", "kv_peak"):
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-5, abs=1e-5), f
    assert [c["method"] for c in one.checks] == [c["method"] for c in two.checks]
    assert [c["diff"] < 1e-4 for c in two.checks] == [True] * len(one.checks)

    def boom(self, trial, check=False):
        raise ValueError("no such trial")

    monkeypatch.setattr(L.Runner, "trial", boom)
    with pytest.raises(RuntimeError, match=r"a bench worker failed(.|\n)*no such trial"):
        L.run_trials(L.Runner(cfg, model, tok, ticks.append), trials, set(), workers=2)


@torch.no_grad()
def test_kept_mask_reads_ragged_caches_with_empty_slots():
    cache = hd.ReducedCache()
    cache.index = {1: torch.tensor([[[-1, 0, 3], [1, 2, 3]]])}
    kept = L.kept_mask(cache, 5)
    assert list(kept) == [1]
    assert kept[1].tolist() == [[[True, False, False, True, False],
                                 [False, True, True, True, False]]]  # fmt: skip
    with pytest.raises(ValueError, match="beyond the prefill"):
        L.kept_mask(cache, 3)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def test_quick_cli_run_writes_json_and_markdown(tok, synthetic_corpora, monkeypatch, tmp_path):
    from tokenmerge.cli.main import build_parser, main
    from tokenmerge.eval import zoo
    from tokenmerge.eval.llm.cli import config as llm_config

    model = tiny_lm(len(tok))
    monkeypatch.setattr(zoo, "load_causal_lm", lambda name: (model, tok))
    argv = [
        "bench", "--model", "hf:tiny", "--kind", "llm", "--quick", "--out", str(tmp_path),
        "--name", "t", "--methods", "snapkv,kvzip,tova,fastv",
        "--param", "bench.lengths=96", "--param", "bench.memory_lengths=96",
        "--param", "bench.speed_length=96", "--param", "bench.continuation=32",
        "--param", "bench.decode_tokens=2", "--param", "bench.chunk=32",
        "--param", "snapkv.window=8", "--param", "kvzip.chunk=32", "--budgets-for", "fastv=4",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=r"methods \(snapkv, kvzip, tova, fastv\); got .h2o=4."):
        main([*argv[:-2], "--budgets-for", "h2o=4"])  # not a benchmarked method
    ticks = []
    monkeypatch.setattr("tqdm.tqdm.update", lambda bar, k=1: ticks.append(k))
    assert main(argv) == 0
    assert sum(ticks) == L.planned_steps(llm_config(build_parser().parse_args(argv)))
    res = json.loads((tmp_path / "t.json").read_text())
    meta = res["meta"]
    assert meta["config"]["trials"] == 2 and meta["config"]["lengths"] == [96]
    assert meta["base"]["trials"] == 2 and meta["base"]["needle_agnostic_se"] is not None
    assert meta["check"]["checks"] > 0 and meta["check"]["max_abs_diff"] < 1e-4
    assert meta["config"]["method_params"]["kvzip"]["prompt"]  # built from the tokenizer
    modes = {(r["method"], r["prefill_mode"]) for r in res["rows"]}
    assert modes == {("snapkv", "oneshot"), ("snapkv", "chunked"), ("kvzip", "oneshot"),
                     ("tova", "oneshot"), ("tova", "chunked"), ("fastv", "prefill")}  # fmt: skip
    # --budgets-for: fastv at 4x only, the others at the quick budgets
    assert {r["factor"] for r in res["rows"] if r["method"] == "fastv"} == {4.0}
    assert {r["factor"] for r in res["rows"] if r["method"] == "snapkv"} == {2.0, 8.0}
    for r in res["rows"]:
        assert r["trials"] == 2 and r["needle_agnostic_se"] is not None
        assert r["prefill_ratio_lo"] <= r["prefill_ratio"] <= r["prefill_ratio_hi"]
        assert r["decode_ratio"] > 0 and r["ppl_ratio"] > 0
        kvzip = math.ceil(meta["speed_context"] / 32)  # reconstruction chunks
        assert r["extra_forwards"] == (kvzip if r["method"] == "kvzip" else 0)
        if r["prefill_mode"] == "oneshot":  # the budget spent, over layers and heads
            assert abs(r["kv_kept"] - 1 / r["factor"]) < 0.02, r
        else:
            assert r["kv_kept"] is None
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# tokenmerge bench: hf:tiny") and "Which method wins" in md
    assert "Perplexity cross-check" in md and " ± " in md
    # the report made again from the saved JSON is the one the run wrote
    (tmp_path / "t.md").unlink()
    assert main(["report", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "t.md").read_text() == md
    with pytest.raises(SystemExit, match="not a saved bench result"):
        main(["report", str(tmp_path / "t.md")])
    # a result whose bench writes its report once is refused by name, not with a KeyError
    for meta in ({"command": "tokenmerge bench --model minilm", "config": {"sets": []}},
                 {"command": "tokenmerge bench-profile"}):  # fmt: skip
        (tmp_path / "other.json").write_text(json.dumps({"meta": meta, "rows": []}))
        with pytest.raises(SystemExit, match=f"written by `{meta['command']}`, whose report"):
            main(["report", str(tmp_path / "other.json")])


@torch.no_grad()
def test_a_speed_only_run_reports_every_timed_configuration(tok, synthetic_corpora):
    """``--tasks speed`` alone: no trial ran, yet every configuration gets its row with its
    prefill time and decode speed (KVzip's ragged cache decoded on its own)."""
    model = tiny_lm(len(tok))
    cfg = _cfg(methods=("snapkv", "kvzip"), factors=(2.0,), tasks=frozenset({"speed"}),
               chunked=False, timing_runs=1, decode_tokens=2, speed_length=64)  # fmt: skip
    r = L.Runner(cfg, model, tok, lambda k: None)
    st = L.make_trials(tok, [cfg.speed_length], 1, cfg.corpora[:1], 1, cfg.seed + 1)[0]
    result = L.summarize(cfg, r, [], r.speed(st), st.context.shape[1], [])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"snapkv", "kvzip"}
    for row in rows.values():
        assert row["prefill_ratio"] > 0 and row["decode_ratio"] > 0 and row["trials"] == 0
        assert row["needle_agnostic"] is None and row["ppl_ratio"] is None
    assert rows["kvzip"]["extra_forwards"] == math.ceil(st.context.shape[1] / 32)
