"""Models dispatched by accelerate (``device_map``: some blocks offloaded to disk, their weights
loaded by accelerate's hooks at each call): tokenmerge's hooks compose with accelerate's, a
zero budget is bit-identical, the reduction is the one the undispatched model makes, and
``tm.remove`` gives accelerate's forwards back."""

from __future__ import annotations

import pytest
import torch

import tokenmerge as tm

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from tests.models import images, make  # noqa: E402
from tests.test_llm import batch, tiny  # noqa: E402


def _offload_every_other(model, prefix: str, n: int, rest: list[str], folder) -> None:
    """Blocks 1, 3, ... on disk, the rest on the CPU."""
    device_map = {f"{prefix}.{i}": "disk" if i % 2 else "cpu" for i in range(n)}
    device_map |= dict.fromkeys(rest, "cpu")
    accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=folder)
    assert type(model.get_submodule(f"{prefix}.1")._hf_hook).__name__ == "AlignDevicesHook"


@torch.no_grad()
def test_a_decoder_with_layers_offloaded_to_disk(tmp_path):
    model = tiny("llama")
    ids, mask, _ = batch()
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    ref = model(ids, attention_mask=mask).logits
    with tm.patched(model, tm.SnapKV(ratio=0.5)):
        reduced = model(ids, attention_mask=mask).logits
        reduced_ids = model.generate(ids, **gen)
    full_ids = model.generate(ids, **gen)
    assert not torch.equal(reduced_ids, full_ids)  # the reduction changes the output
    rest = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    _offload_every_other(model, "model.layers", 4, rest, tmp_path)
    with tm.patched(model, tm.SnapKV(ratio=0.0)):
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    with tm.patched(model, tm.SnapKV(ratio=0.5)):
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reduced)
        assert torch.equal(model.generate(ids, **gen), reduced_ids)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)


@torch.no_grad()
def test_a_vision_encoder_with_blocks_offloaded_to_disk(tmp_path):
    model, _ = make("hf-dinov2-sdpa")  # the adapter matrix's tiny DINOv2: 64 patches, 3 blocks
    x = images(2)
    ref = model(pixel_values=x).last_hidden_state
    with tm.patched(model, tm.ToMe(r=8)):
        reduced = model(pixel_values=x).last_hidden_state
    _offload_every_other(model, "encoder.layer", 3, ["embeddings", "layernorm"], tmp_path)
    with tm.patched(model, tm.ToMe(r=0)):
        assert torch.equal(model(pixel_values=x).last_hidden_state, ref)
    with tm.patched(model, tm.ToMe(r=8)):
        out = model(pixel_values=x).last_hidden_state
        assert [int(c[0]) for c in tm.state(model).tokens_per_layer] == [57, 49, 41]
    assert out.shape == reduced.shape == (2, 41, 32)
    torch.testing.assert_close(out, reduced)
    assert torch.equal(model(pixel_values=x).last_hidden_state, ref)
