"""The diffusion bench (``tokenmerge bench --model sd15-unet-random``) and its model loaders.

The full-size SD-1.5 and SDXL UNets are only ever built on the meta device here (SDXL is
2.6B parameters); everything that runs uses the tiny configurations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import tokenmerge as tm
from tokenmerge import zoo
from tokenmerge.cli.main import build_parser, main
from tokenmerge.eval.diffusion import bench, report
from tokenmerge.eval.diffusion.cli import config
from tokenmerge.eval.zoo import diffusion as dz

# --------------------------------------------------------------------------------------------
# Configurations and loaders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params", [("sd15-unet-random", 859_520_964), ("sdxl-unet-random", 2_567_463_684)]
)
def test_full_configs_have_the_published_parameter_counts(name: str, params: int) -> None:
    assert dz.count_params(name) == params  # 859.5M and 2567.5M, built on the meta device


def test_full_configs_match_the_published_layouts() -> None:
    sd, xl = dz.SD15_UNET, dz.SDXL_UNET
    assert sd["block_out_channels"] == [320, 640, 1280, 1280] and sd["cross_attention_dim"] == 768
    assert sd["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert xl["down_block_types"] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
    assert xl["transformer_layers_per_block"] == [1, 2, 10] and xl["cross_attention_dim"] == 2048
    assert xl["addition_embed_type"] == "text_time" and xl["use_linear_projection"] is True


@pytest.mark.parametrize(
    "name, text, extra",
    [("sd15-unet-random", 768, None), ("sdxl-unet-random", 2048, (1280, 6))],
)
def test_inputs_of_one_step_have_the_pipelines_shapes(name: str, text: int, extra) -> None:
    with torch.device("meta"):
        model = dz._cls(name)(**dz.ARCHS[name][1])
    kw = dz.DiffusionInputs.of(model)(2, 1024, seed=0)
    assert kw["sample"].shape == (2, 4, 128, 128) and kw["sample"].device.type == "cpu"
    assert kw["encoder_hidden_states"].shape == (2, 77, text) and kw["timestep"].dim() == 0
    if extra is None:
        assert "added_cond_kwargs" not in kw
    else:
        cond = kw["added_cond_kwargs"]
        assert cond["text_embeds"].shape == (2, extra[0]) and cond["time_ids"].shape == (2, 6)
        assert cond["time_ids"][0].tolist() == [1024, 1024, 0, 0, 1024, 1024]


def test_tiny_models_are_seeded_and_each_family_runs() -> None:
    for name in dz.TINY:
        a, inputs = dz.load_diffusion(name, seed=3)
        b, _ = dz.load_diffusion(name, seed=3)
        c, _ = dz.load_diffusion(name, seed=4)
        kw = inputs(2, dz.NATIVE[name][0], seed=1)
        with torch.inference_mode():
            ya, yb, yc = (m(**kw)[0] for m in (a, b, c))
        assert torch.equal(ya, yb), name
        assert not torch.equal(ya, yc), name
        latents = kw["sample"] if "sample" in kw else kw["hidden_states"]
        assert ya.shape[0] == 2 and ya.shape[-2:] == latents.shape[-2:]


def test_tomesd_with_the_same_seed_gives_the_same_output() -> None:
    model, inputs = dz.load_diffusion("tiny-unet")
    kw = inputs(2, 128, seed=5)
    outs = []
    with torch.inference_mode():
        for seed in (0, 0, 1):
            with tm.patched(model, tm.ToMeSD(ratio=0.5, seed=seed)):
                outs.append(model(**kw)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # the draw of destinations follows the seed


def _tiny_unet(folder: Path) -> torch.nn.Module:
    model = dz.build("tiny-unet", seed=7)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("layout", ["pipeline", "unet"])
def test_hf_local_folder_loads_offline(tmp_path: Path, layout: str) -> None:
    ref = _tiny_unet(tmp_path / "unet" if layout == "pipeline" else tmp_path)
    model, inputs = zoo.load(f"hf:{tmp_path}", kind="diffusion")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    want = ref.state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    kw = inputs(1, 128, seed=0)
    with torch.inference_mode():  # loaded tensors may sit differently in memory: 1e-6 apart
        torch.testing.assert_close(model(**kw)[0], ref(**kw)[0])


def test_the_zoo_lists_random_weights_plainly() -> None:
    for name in bench.MODELS:
        m = zoo.CATALOG[name]
        assert m.kind == "diffusion" and "RANDOM weights" in m.description
        assert not m.in_ci  # no CI test builds a full-size UNet
    with pytest.raises(ValueError, match="is a diffusion model, not 'vision'"):
        zoo.load("sdxl-unet-random", kind="vision")
    with pytest.raises(KeyError, match="unknown diffusion model 'sd2'"):
        dz.load_diffusion("sd2")


# --------------------------------------------------------------------------------------------
# The bench through the CLI (tiny architecture)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diffusion")
    argv = ["bench", "--model", "sd15-unet-random", "--quick", "--budgets", "0,0.3,0.5",
            "--param", "bench.batches=1,2", "--param", "bench.resolutions=128,192",
            "--timing-runs", "2",
            "--out", str(out), "--name", "d"]  # fmt: skip
    assert main(argv) == 0
    return out / "d.json"


def test_the_cli_writes_a_sane_json(saved: Path) -> None:
    data = json.loads(saved.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["config"]["bench"] == "diffusion" and meta["config"]["arch"] == "tiny"
    assert meta["timed_model"] == "tiny-unet" and meta["versions"]["diffusers"]
    assert meta["machine"]["torch_threads"] >= 1 and meta["seed"] == 0
    assert meta["method"]["sx"] == 2 and "ratio" not in meta["method"]
    keys = [(r["resolution"], r["batch"], r["ratio"]) for r in rows]
    assert keys == [(res, b, q) for res in (128, 192) for b in (1, 2) for q in (0.0, 0.3, 0.5)]
    for r in rows:
        side = r["resolution"] // 8
        assert r["tokens"] == side * side and r["patched_blocks"] == 3  # SD-1.5's level 1/1
        assert r["speedup"] > 0 and r["base_s"] > 0 and r["patched_s"] > 0
        for b in r["blocks"]:
            assert b["downsample"] == 1 and b["tokens"] == side * side
            assert b["kept"] == b["tokens"] - int(b["tokens"] * r["ratio"])  # tomesd's r
        assert sum(g["blocks"] for g in r["levels"]) == len(r["blocks"])
    fid = meta["fidelity"]
    assert {f["model"] for f in fid} == set(dz.TINY) and len(fid) == 3 * len(dz.TINY)
    for f in fid:
        assert f["inputs"] == 2 and -1 <= f["cosine_min"] <= f["cosine"] <= 1 + 1e-6
        if f["ratio"] == 0:
            assert f["kept"] == f["tokens"] and f["cosine"] == pytest.approx(1, abs=1e-6)
        else:
            assert f["kept"] == f["tokens"] - int(f["tokens"] * f["ratio"]) < f["tokens"]
    sdxl = [f for f in fid if f["model"] == "tiny-sdxl-unet"]
    assert all(g["downsample"] == 2 for f in sdxl for g in f["levels"])  # no attention at 1/1
    md = saved.with_suffix(".md").read_text()
    assert "**Smoke test: the weights are random and the model is tiny.**" in md
    assert "| 192 | 2 | 0.500 | 576 → 288 |" in md
    assert re.search(r"\| \d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\) \|", md)  # median (IQR)
    assert saved.with_suffix(".png").stat().st_size > 0


def test_report_remakes_the_files_identically(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "again.json"
    copy.write_text(saved.read_text())
    assert main(["report", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == saved.with_suffix(".md").read_text()
    assert copy.with_suffix(".png").read_bytes() == saved.with_suffix(".png").read_bytes()


def test_a_hub_folder_is_timed_with_its_own_weights(tmp_path: Path) -> None:
    _tiny_unet(tmp_path / "model" / "unet")
    argv = ["bench", "--model", f"hf:{tmp_path / 'model'}", "--kind", "diffusion",
            "--budgets", "0.5", "--batch-size", "1", "--timing-runs", "1",
            "--param", "bench.fidelity_inputs=0", "--param", "bench.timing_warmup=0",
            "--out", str(tmp_path), "--name", "hub"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "hub.json").read_text())
    assert [(r["resolution"], r["tokens"], r["kept"]) for r in data["rows"]] == [(128, 256, 128)]
    assert data["meta"]["fidelity"] == [] and data["meta"]["params"] == dz.count_params("tiny-unet")
    assert "with the weights loaded from there" in (tmp_path / "hub.md").read_text()


# --------------------------------------------------------------------------------------------
# Bad input: refused by name, before anything loads
# --------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loaded before the arguments were checked")

    monkeypatch.setattr(bench, "load_diffusion", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--budgets", "0.8"],
            "ToMeSD ratios (the share of each patched block's tokens "
            "merged) from 0 to 0.75; got 0.8",
        ),
        (["--budgets", "-0.1"], "from 0 to 0.75; got -0.1"),
        (
            ["--budgets", "half"],
            "ToMeSD ratios (the share of each patched block's tokens merged) "
            "from 0 to 0.75, e.g. 0.3,0.5,0.6; got 'half'",
        ),
        (
            ["--param", "bench.resolutions=512,500"],
            "multiples of 64 from 64 to 4096 (e.g. 512,1024); got 500",
        ),
        (["--param", "bench.resolutions=8192"], "from 64 to 4096"),
        (["--param", "bench.resolutions=big"], "bench.resolutions takes whole numbers"),
        (["--param", "bench.batches=0"], "bench.batches must be a whole number >= 1, got 0"),
        (["--param", "bench.arch=huge"], "bench.arch must be one of full, tiny, got 'huge'"),
        (["--param", "bench.dtype=int8"], "bench.dtype must be one of float32, float16, bfloat16"),
        (["--param", "bench.device=tpu"], "bench.device must be cpu or cuda[:N]"),
        (["--param", "bench.steps=4"], "bench has no parameter 'steps'; accepted: resolutions,"),
        (["--param", "tomesd.ratio=0.5"], "'ratio' is its budget"),
        (["--param", "tomesd.sx=1", "--param", "tomesd.sy=1"], "must hold at least 2 tokens"),
        (["--param", "tome.prop_attn=true"], "not benchmarked: ['tome'] (only tomesd)"),
        (["--methods", "tome"], "measures tomesd only; got --methods tome"),
        (["--tasks", "speed"], "--tasks does not apply to the diffusion bench"),
        (["--batch-size", "2", "--param", "bench.batches=1"], "not both"),
        (["--kind", "vision"], "'sd15-unet-random' is a diffusion model; bench needs a vision"),
    ],
)
def test_bad_input_is_refused_by_name(
    argv: list[str], message: str, nothing_loads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "--model", "sd15-unet-random", *argv, "--out", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def _config(*argv: str) -> bench.DiffusionBenchConfig:
    return config(build_parser().parse_args(["bench", *argv]))


def test_settings_reach_the_config(nothing_loads: None) -> None:
    cfg = _config("--model", "sdxl-unet-random", "--budgets", "0.8", "--param", "tomesd.sx=4",
                  "--param", "bench.resolutions=512/1024", "--batch-size", "3")  # fmt: skip
    assert cfg.ratios == (0.8,) and cfg.method_params == {"sx": 4}  # 4x2 cells: up to 0.875
    assert cfg.resolutions == (512, 1024) and cfg.batches == (3,) and cfg.arch == "full"
    assert bench.planned_steps(cfg) == 2 + len(dz.TINY)
    d = _config("--model", "sd15-unet-random")
    assert (d.ratios, d.batches, bench.resolutions(d)) == ((0.3, 0.5, 0.6), (1, 2), (512, 1024))
    assert bench.resolutions(_config("--model", "sdxl-unet-random")) == (1024,)
    quick = _config("--model", "sdxl-unet-random", "--quick")
    assert (quick.arch, quick.ratios, quick.batches, quick.timing_runs) == ("tiny", (0.5,), (1,), 1)
    assert bench.timed_model(quick) == "tiny-sdxl-unet" and bench.resolutions(quick) == (128,)
    assert (
        quick.fidelity_inputs == 2
        and _config("--model", "sd15-unet-random", "--quick", "--n", "3").fidelity_inputs == 3
    )
    assert (
        _config(
            "--model", "sd15-unet-random", "--quick", "--param", "bench.fidelity_inputs=0"
        ).fidelity_inputs
        == 0
    )
    with pytest.raises(ValueError, match=r"bench\.arch=tiny applies to sd15-unet-random"):
        _config("--model", "hf:org/sd", "--kind", "diffusion", "--param", "bench.arch=tiny")


def test_a_family_the_settings_do_not_fit_is_reported_not_dropped() -> None:
    cfg = bench.DiffusionBenchConfig(
        ratios=(0.5,), fidelity_inputs=1, method_params={"max_downsample": 1}
    )
    rows = {r["model"]: r for r in bench.fidelity(cfg, lambda k: None)}
    assert set(rows) == set(dz.TINY)
    assert "max_downsample=1" in rows["tiny-sdxl-unet"]["skipped"]  # no attention at 1/1
    assert rows["tiny-unet"]["kept"] == 128 and "skipped" not in rows["tiny-dit"]
    result = {"rows": [], "fidelity": list(rows.values()), "params": 1, "timed_model": "x",
              "method": {"max_downsample": 1}}  # fmt: skip
    meta = {"machine": {"platform": "p", "processor": "q", "cpus": 2, "torch_threads": 2},
            "versions": {}, "date": "d", "command": "c", "seed": 0}  # fmt: skip
    md = report.markdown(cfg, result, meta)
    assert "- not measured: tiny-sdxl-unet at ratio 0.5: ToMeSD(max_downsample=1)" in md
