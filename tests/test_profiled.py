"""``tokenmerge bench-profile``: operator groups and the per-budget rows (tiny model)."""

from __future__ import annotations

import pytest
from models import images, make

from tokenmerge.adapters.base import ATTR
from tokenmerge.cli.main import main
from tokenmerge.core.budget import parse_budget
from tokenmerge.eval import profiled


def test_operators_fall_into_their_groups():
    assert profiled.group_of("aten::addmm") == "matrix products"
    assert profiled.group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profiled.group_of("aten::native_layer_norm") == "normalisation"
    assert profiled.group_of("aten::index_copy_") == "data movement"
    assert profiled.group_of("aten::gelu") == "activation"
    assert profiled.group_of("aten::add") == profiled.OTHER


def test_rows_add_up_and_carry_the_flops_of_the_tokens_kept():
    model, run = make("hf-dinov2-sdpa")
    rows = profiled.run(model, run, images(4), "tome", [parse_budget("0"), parse_budget("8")], 1)
    assert [r["budget"] for r in rows] == ["unpatched", "r=0", "r=8"]
    for r in rows:
        assert set(r["ms"]) == {*profiled.GROUPS, profiled.OTHER}
        assert r["total_ms"] == pytest.approx(sum(r["ms"].values()))
        assert r["speedup"] == pytest.approx(rows[0]["total_ms"] / r["total_ms"])
    assert rows[1]["flops_ratio"] == pytest.approx(1.0)
    assert rows[2]["flops_ratio"] < 1  # 65 tokens, 8 fewer in each of 3 layers
    assert rows[2]["realised_over_predicted"] == pytest.approx(
        rows[2]["speedup"] * rows[2]["flops_ratio"]
    )
    assert rows[0]["ms"]["matrix products"] > 0
    md = profiled.markdown({"model": "m", "method": "tome", "batch_size": 4, "calls": 1,
                            "load_avg": [0.0]}, rows)  # fmt: skip
    assert md.count("\n| r=") == 2
    assert not any(hasattr(m, ATTR) for m in model.modules())  # removed after each budget


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nosuch"], "nosuch"),
        (["--dataset", "nope"], "accepted: textiles"),
        (["--budgets", "x"], "budget"),
    ],
)
def test_bad_input_is_refused_before_loading(argv, message, capsys):
    assert main(["bench-profile", *argv]) == 2
    assert message in capsys.readouterr().err
