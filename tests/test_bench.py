"""`quantsd bench` logic that needs no GPU: max-resolution binary search (fake memory model),
reports (JSON / Markdown / PNG), in-memory packing, configuration list, CLI errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantsd.bench import (BenchConfig, binary_search_max, default_configs, markdown_report, optional_configs,
                           summary_rows, to_packed, weight_bytes, write_reports)
from quantsd.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "paper-final.yaml"


def _fake_memory(weights_gb: float, per_mpix_gb: float, cap_gb: float):
    """fits(s): resident weights + activations linear in the pixel count under the cap."""
    calls = []

    def fits(s):
        calls.append(s)
        return weights_gb + per_mpix_gb * (s * s) / 1e6 <= cap_gb

    return fits, calls


@pytest.mark.parametrize("cap", [4.0, 8.0, 1.3, 100.0])
def test_binary_search_matches_linear_scan(cap):
    fits, calls = _fake_memory(0.6, 0.35, cap)
    res = binary_search_max(fits, 256, 8192, 64)
    linear = [s for s in range(256, 8193, 64) if fits(s)]
    assert res["max"] == (max(linear) if linear else None)
    assert res["complete"]
    assert len(res["probes"]) <= 2 + 8  # log2(124 candidates) + the two ends
    if res["max"] is not None and res["max"] < 8192:
        assert res["fail"] == res["max"] + 64
        assert all(s % 64 == 0 for s, _ in res["probes"])


def test_binary_search_edges_and_deadline():
    assert binary_search_max(lambda s: False, 256, 1024)["max"] is None
    assert binary_search_max(lambda s: True, 256, 1024)["max"] == 1024
    assert binary_search_max(lambda s: s <= 300, 250, 1000)["max"] == 256  # lo rounded up to 256
    res = binary_search_max(lambda s: s <= 3000, 256, 8192, deadline=time.monotonic() - 1)
    assert not res["complete"] and res["fit"] == 256 and res["fail"] == 8192
    with pytest.raises(ValueError):
        binary_search_max(lambda s: True, 1000, 900)


def test_binary_search_skips_a_lo_known_to_fit():
    seen = []
    fits = lambda s: seen.append(s) or s <= 4032  # noqa: E731
    full = binary_search_max(fits, 256, 8192)
    seen.clear()
    warm = binary_search_max(fits, 3008, 8192, lo_fits=True)   # e.g. the answer under a smaller cap
    assert warm["max"] == full["max"] == 4032 and 3008 not in seen
    assert len(warm["probes"]) < len(full["probes"])


def test_binary_search_reports_each_probe_as_it_ends():
    """on_probe hears every probe, in order, before the search goes on: a search killed mid-way (a
    large side's probe can outlast the time box) has already logged its bracket."""
    heard = []

    def fits(s):
        if s == 8192:     # the search's second probe: the first must be reported already
            assert heard == [(256, True)]
        return s <= 5000

    res = binary_search_max(fits, 256, 8192, on_probe=lambda s, ok: heard.append((s, ok)))
    assert heard == res["probes"] and res["max"] == 4992
    assert heard[:2] == [(256, True), (8192, False)]


def test_weight_bytes_counts_params_and_buffers_once():
    m = torch.nn.Linear(10, 4)
    m.register_buffer("b", torch.zeros(3, dtype=torch.float16))
    m.shared = m.weight  # same tensor again
    assert weight_bytes(m) == (40 + 4) * 4 + 6
    assert weight_bytes(m, "cuda") == 0


def test_default_configs():
    names = [c.name for c in default_configs(recipe=True, compile=True)]
    assert names == ["fp16-sdpa", "packed", "fp32-classic", "fp16-sdpa-compiled", "fp16-sdpa-compiled-cl",
                     "packed-compiled"]
    assert [(c.name, c.grouped, c.prefetch, c.prehook, c.compile) for c in optional_configs(True, True)] == [
        ("fp16-sdpa-inspect", True, False, None, False), ("fp16-sdpa-pytorch", True, False, None, False),
        ("packed-pytorch", True, False, None, False), ("packed-modcall", True, False, None, False),
        ("packed-checked", True, False, False, False), ("packed-roots", True, False, None, False),
        ("packed-groups-512", True, False, None, False),
        ("packed-groups-384", True, False, None, False), ("packed-groups-256", True, False, None, False),
        ("packed-groups-96", True, False, None, False),
        ("fp16-sdpa-compiled-flash", True, False, None, True), ("packed-compiled-flash", True, False, None, True),
        ("packed-compiled-per-layer", False, False, None, True),
        ("packed-compiled-prefetch", True, True, None, True)]
    assert [c.name for c in optional_configs(True, False)] == ["fp16-sdpa-inspect", "fp16-sdpa-pytorch", "packed-pytorch",
                                                               "packed-modcall", "packed-checked", "packed-roots",
                                                               "packed-groups-512", "packed-groups-384",
                                                               "packed-groups-256", "packed-groups-96"]
    assert [c.group_max_mib for c in optional_configs(True, False)[6:]] == [512, 384, 256, 96]
    assert [c.runs for c in optional_configs(True, False)] == [None, None, None, None, None, False, None, None, None,
                                                               None]
    assert [c.name for c in optional_configs(True, False) if c.armed_calls is not None] == ["packed-modcall"]
    assert optional_configs(True, False)[3].armed_calls is False
    assert [(c.packed, c.direct_attention, c.sdpa_backend) for c in optional_configs(True, False)][:4] == [
        (False, False, "auto"), (False, True, "pytorch"), (True, True, "pytorch"), (True, True, "auto")]
    assert all(c.sdpa_backend == "auto" for c in default_configs(True, True))
    assert [c.sdpa_backend for c in optional_configs(True, True) if c.name.endswith("-compiled-flash")] == ["flash"] * 2
    assert all(c.direct_attention for c in default_configs(True, True))
    assert optional_configs(False, True) == []
    assert [c.name for c in default_configs(False, False)] == ["fp16-sdpa", "fp32-classic"]
    fp32 = default_configs(False, False)[1]
    assert fp32.attention == "classic" and fp32.torch_dtype == torch.float32


def _fake_results():
    return {
        "meta": {"model": "sd15-arch", "recipe": "paper-final", "gpu": "FakeGPU", "torch": "x", "triton": "y",
                 "steps": 50, "guidance": 7.5, "height": 512, "width": 512, "started": "now", "finished": "later"},
        "sdpa": {"flash_sdp_enabled": True, "probes": {"self_d40": "flash ok"}, "dtype": "float16"},
        "configs": [
            {"name": "fp16-sdpa", "unet_ms": {"median": 26.0}, "unet_ms_pipelined": {"median": 21.0},
             "image": {"median": 1.4, "peak_vram_bytes": 3 * 2**30}, "image_dpm": {"median": 1.1, "scheduler": "D"},
             "unet_weight_mib": 1639.3, "attention_kernels": {"backend": "flash"},
             "sweep_unet_ms": {"256": 20.0, "512": 26.0, "768": 40.0},
             "max_res_sequential_8gb": {"max": 4096, "fit": 4096, "fail": 4160, "cap_gb": 8, "complete": True}},
            {"name": "packed", "unet_ms": {"median": 27.0}, "image": {"median": 1.45, "peak_vram_bytes": 2**30},
             "unet_weight_mib": 550.0, "sweep_unet_ms": {"256": 21.0, "512": "OOM"},
             "max_res_sequential_8gb": {"error": "OOM"}},
            {"name": "fp32-classic", "unet_ms": {"median": 90.0}, "image": {"median": 5.6, "peak_vram_bytes": 2**32},
             "image_err": {"error": "RuntimeError: boom"}},
        ],
    }


def test_reports_written(tmp_path):
    paths = write_reports(_fake_results(), tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["configs"][0]["name"] == "fp16-sdpa"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| fp16-sdpa | 26 | 21 | 1.4 | 4 |" in md and "max res sequential_8gb" in md
    assert "s/image dpm" in md and "| 1.1 |" in md
    assert "RuntimeError: boom" in md and "flash ok" in md
    png = tmp_path / "out" / "time_vs_pixels.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows = summary_rows(data)
    assert rows[1]["max_res_sequential_8gb"] == "OOM" and rows[0]["speedup_vs_fp32_classic"] == pytest.approx(4.0)
    assert rows[0]["s_per_image_dpm"] == 1.1 and rows[1].get("s_per_image_dpm") is None
    assert rows[0]["unet_ms_pipelined"] == 21.0 and rows[1]["unet_ms_pipelined"] is None
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_select_configs_keeps_run_order_and_names_the_valid_ones():
    from quantsd.bench.core import default_configs, select_configs

    cfgs = default_configs(recipe=True, compile=True)
    assert select_configs(cfgs, ()) == cfgs
    got = select_configs(cfgs, ["packed-compiled", "fp16-sdpa-compiled"])
    assert [c.name for c in got] == ["fp16-sdpa-compiled", "packed-compiled"]
    with pytest.raises(ValueError, match="packed-compiled"):     # the message lists what exists
        select_configs(default_configs(recipe=True, compile=False), ["packed-compiled"])
    # optional configurations run only when named, after the default ones
    opt = optional_configs(recipe=True, compile=True)
    assert select_configs(cfgs, (), opt) == cfgs
    got = select_configs(cfgs, ["packed-compiled-per-layer", "packed-compiled"], opt)
    assert [(c.name, c.grouped) for c in got] == [("packed-compiled", True), ("packed-compiled-per-layer", False)]
    with pytest.raises(ValueError, match="packed-compiled-prefetch"):
        select_configs(cfgs, ["packed-compiled-prefetchh"], opt)
    # an eager optional configuration runs before every compiled one (so the eager pair, which runs
    # before the first compiled configuration, can take it into its turns)
    got = select_configs(cfgs, ["fp16-sdpa", "packed", "packed-compiled", "packed-checked"], opt)
    assert [c.name for c in got] == ["fp16-sdpa", "packed", "packed-checked", "packed-compiled"]


def test_markdown_names_lean_runs():
    res = _fake_results()
    assert "lean VAE decode" not in markdown_report(res)
    res["meta"]["lean"] = True
    assert "lean VAE decode, VAE encoder dropped" in markdown_report(res)
    res["meta"].update(max_res_ff_chunk=4096, caps_gb=[8.0])
    assert "feed-forward chunks of 4096 tokens" in markdown_report(res)
    res["meta"]["caps_gb"] = []      # no max-res search: nothing to say about its probes
    assert "feed-forward chunks" not in markdown_report(res)
    res["meta"].update(compile=True, compile_guards="minimal")
    assert "compiled with minimal guards" in markdown_report(res)
    assert "fused dequant-GEMM" not in markdown_report(res)
    res["meta"].update(fused_max_rows=256, fused_tuned_shapes=3)
    assert "fused dequant-GEMM for layers of <= 256 rows, 3 tuned shapes" in markdown_report(res)


def test_markdown_lists_dequant_launches_of_packed_rows():
    res = _fake_results()
    assert "Dequant launches" not in markdown_report(res)
    res["configs"][1]["unet_dequant_launches"] = {"groups": 35, "lone_layers": 83, "launches": 118}
    assert "Dequant launches per UNet call: packed 118 (35 groups + 83 lone layers)" in markdown_report(res)
    res["meta"]["grouped_dequant"] = False
    assert "packed with one dequant launch per layer" in markdown_report(res)


def test_markdown_partial_results():
    md = markdown_report({"meta": {"model": "m"}, "configs": [{"name": "fp16-sdpa", "build": {"error": "OOM"}}]})
    assert "(cut short)" in md and "build: OOM" in md


def test_markdown_flags_memory_left_after_a_configuration():
    """A configuration that leaves memory allocated after its release makes every later peak and
    max-res search in the run wrong: the report says so, naming it (small remainders are not noise)."""
    cfgs = [{"name": "fp16-sdpa-compiled", "left_allocated_bytes": 3 << 29},
            {"name": "packed", "left_allocated_bytes": 1 << 20}]
    md = markdown_report({"meta": {"model": "m"}, "configs": cfgs})
    assert "fp16-sdpa-compiled 1.50 GiB" in md and "packed 0.00" not in md
    assert "still allocated" not in markdown_report({"meta": {"model": "m"}, "configs": cfgs[1:]})


def test_to_packed_equals_simulated_quantization():
    from quantsd.models import load_pipeline
    from quantsd.nn import packed_modules
    from quantsd.recipe import apply_recipe

    pipe = load_pipeline("tiny")
    pipe.unet.eval()
    pipe.vae.train()
    packed, plan = to_packed(pipe, RECIPE, torch.float32)
    # each packed module takes the mode of the module it replaced (eval-only fast paths stay on)
    assert not any(m.training for _, m in packed_modules(packed.unet))
    assert all(m.training for _, m in packed_modules(packed.vae)) and packed_modules(packed.vae)
    sim = load_pipeline("tiny")
    apply_recipe(sim, RECIPE, warn=False)
    n = len(packed_modules(packed.unet))
    assert n > 0 and n == sum(1 for lp in plan.layers if lp.path.startswith("unet."))
    assert weight_bytes(packed.unet) < weight_bytes(sim.unet)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        a = packed.unet(lat, 10, encoder_hidden_states=ctx).sample
        b = sim.unet(lat, 10, encoder_hidden_states=ctx).sample
    assert torch.equal(a, b)


def test_cli_bench_help_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "--max-res-cap-gb" in r.output and "--compile" in r.output
    r = CliRunner().invoke(main, ["bench", "--max-res-cfg", "nope", "-o", str(tmp_path)])
    assert r.exit_code != 0 and "nope" in r.output
    r = CliRunner().invoke(main, ["bench", "--only", "packed", "-o", str(tmp_path)])   # no recipe: no packed row
    assert r.exit_code != 0 and "--only" in r.output and "fp16-sdpa" in r.output
    r = CliRunner().invoke(main, ["bench", "--max-res-ff-chunk", "-5", "-o", str(tmp_path)])
    assert r.exit_code != 0 and "--max-res-ff-chunk" in r.output
    r = CliRunner().invoke(main, ["bench", "--schedulers", "dpm,heun", "-o", str(tmp_path)])
    assert r.exit_code != 0 and "heun" in r.output and "dpm" in r.output.split("valid:")[-1]
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["bench", "-m", "tiny", "-o", str(tmp_path / "b")])
        assert r.exit_code != 0 and "CUDA" in r.output
        # the new options parse and validate before the CUDA check: only the missing GPU stops them
        r = CliRunner().invoke(main, ["bench", "-m", "tiny", "--lean", "--schedulers", "dpm,ddim", "--max-res-ff-chunk", "0",
                                      "--only", "fp16-sdpa", "--no-grouped-dequant", "--dense-below", "262144",
                                      "--eager-pair-rounds", "3", "--eager-pair-calls", "1", "-o", str(tmp_path / "b")])
        assert r.exit_code != 0 and "no CUDA device" in r.output and not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, ["bench", "--dense-below", "-1", "-o", str(tmp_path / "c")])
    assert r.exit_code != 0 and "--dense-below" in r.output and not (tmp_path / "c").exists()
    r = CliRunner().invoke(main, ["bench", "--eager-pair-rounds", "-1", "-o", str(tmp_path / "d")])
    assert r.exit_code != 0 and "--eager-pair-rounds" in r.output and not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, ["bench", "--eager-pair-calls", "0", "-o", str(tmp_path / "e")])
    assert r.exit_code != 0 and "--eager-pair-calls" in r.output and not (tmp_path / "e").exists()


def test_release_frees_a_minimal_guard_compiled_unet():
    """The bench lets a measured pipeline go before building the next: the compiled method a
    minimal-guard compile puts on the UNet (a reference cycle) is removed, Dynamo is reset, and
    the UNet is freed by reference counting alone (no garbage collection needed)."""
    import gc
    import weakref

    import quantsd
    from quantsd.bench.core import _release
    from quantsd.generate import compile_unet

    pipe = quantsd.load_pipeline("tiny")
    unet = compile_unet(pipe.unet, None, guards="minimal", backend="eager")
    assert "forward" in vars(unet)
    alive = weakref.ref(unet)
    del unet
    gc.disable()
    try:
        _release(pipe, compiled=True)
        assert "forward" not in vars(pipe.unet)
        del pipe
        assert alive() is None
    finally:
        gc.enable()


def test_build_pipeline_applies_the_configuration_options():
    """build_pipeline goes through configure_pipeline (as quantsd generate does): attention per
    configuration, sync-free scheduler, --dense-below on packed configurations only."""
    from diffusers.models.attention_processor import AttnProcessor

    from quantsd.bench.core import build_pipeline
    from quantsd.nn import packed_modules
    from quantsd.recipe import load_recipe
    from quantsd.schedulers import is_sync_free

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "paper-final.yaml")
    packed = build_pipeline("tiny", BenchConfig("packed", packed=True), torch.device("cpu"), recipe=recipe)
    n = len(packed_modules(packed.unet))
    dense = build_pipeline("tiny", BenchConfig("packed", packed=True), torch.device("cpu"), recipe=recipe,
                           dense_below=10**9)
    assert n > 0 and len(packed_modules(dense.unet)) == 0 and is_sync_free(dense.scheduler)
    classic = build_pipeline("tiny", BenchConfig("fp32-classic", dtype="float32", attention="classic"),
                             torch.device("cpu"), dense_below=10**9)
    assert all(isinstance(p, AttnProcessor) for p in classic.unet.attn_processors.values())


def test_build_pipeline_passes_the_prehook_choice_to_grouping(monkeypatch):
    """The packed-checked configuration reaches group_pipeline as prehook=False (eager),
    packed-groups-256 as a 256 MiB cap and packed-roots as runs=False; the others leave them to the
    default and the environment."""
    from quantsd import dequant_groups as DG
    from quantsd.bench.core import build_pipeline
    from quantsd.recipe import load_recipe

    seen = []
    monkeypatch.setattr(DG, "group_pipeline", lambda pipe, **kw: seen.append(kw) or 0)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "paper-final.yaml")
    pre = [c for c in optional_configs(True, False) if c.name == "packed-checked"][0]
    build_pipeline("tiny", pre, torch.device("cpu"), recipe=recipe)
    build_pipeline("tiny", BenchConfig("packed", packed=True), torch.device("cpu"), recipe=recipe)
    big = [c for c in optional_configs(True, False) if c.name == "packed-groups-256"][0]
    build_pipeline("tiny", big, torch.device("cpu"), recipe=recipe)
    roots = [c for c in optional_configs(True, False) if c.name == "packed-roots"][0]
    build_pipeline("tiny", roots, torch.device("cpu"), recipe=recipe)
    assert [kw["prehook"] for kw in seen] == [False, None, None, None]
    assert [kw["max_bytes"] for kw in seen] == [None, None, 256 << 20, None]
    assert [kw["runs"] for kw in seen] == [None, None, None, False]


def test_build_pipeline_gives_direct_attention_calls_except_to_the_inspect_variant():
    """Every eager configuration's attentions call their processor directly; fp16-sdpa-inspect keeps
    diffusers' own forward (its place in the eager pair measures what the direct calls save)."""
    from diffusers.models.attention_processor import Attention

    from quantsd.bench.core import build_pipeline

    def direct(pipe):
        return {"forward" in m.__dict__ for m in pipe.unet.modules() if isinstance(m, Attention)}

    inspect_cfg = [c for c in optional_configs(True, False) if c.name == "fp16-sdpa-inspect"][0]
    assert direct(build_pipeline("tiny", BenchConfig("fp16-sdpa"), torch.device("cpu"))) == {True}
    assert direct(build_pipeline("tiny", inspect_cfg, torch.device("cpu"))) == {False}


def test_attention_backend_comes_from_the_dispatched_aten_ops():
    """The backend is the SDPA op that ran, not a kernel-name fragment (cuDNN's kernels say "flash"):
    one backend, several joined, or classic attention where no SDPA op ran."""
    from quantsd.bench.core import attention_backend_of

    assert attention_backend_of({"aten::_scaled_dot_product_cudnn_attention": 32}) == "cudnn"
    assert attention_backend_of({"aten::_scaled_dot_product_flash_attention": 32}) == "flash"
    assert attention_backend_of({"aten::_scaled_dot_product_flash_attention": 16,
                                 "aten::_scaled_dot_product_efficient_attention": 16}) == "flash+mem_efficient"
    assert attention_backend_of({"aten::_scaled_dot_product_flash_attention": 0}) == "classic"
    assert attention_backend_of({}) == "classic"


def test_attention_backend_of_a_real_cpu_forward():
    """On the CPU the tiny UNet's SDPA calls dispatch to an op the table knows (flash for CPU or math),
    and diffusers' classic processor to none: the profiler's op names still match SDPA_OPS."""
    from torch.profiler import ProfilerActivity, profile

    from quantsd.bench.core import SDPA_OPS, attention_backend_of, build_pipeline

    def backend(cfg):
        pipe = build_pipeline("tiny", cfg, torch.device("cpu"))
        lat = torch.randn(2, 4, 16, 16)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe.unet(lat, torch.tensor([10, 10]), encoder_hidden_states=ctx, return_dict=False)
        return attention_backend_of({e.key: e.count for e in prof.key_averages() if e.key in SDPA_OPS})

    assert backend(BenchConfig("fp32-sdpa", dtype="float32")) in ("flash", "math")
    assert backend(BenchConfig("fp32-classic", dtype="float32", attention="classic")) == "classic"


def test_packed_ratios_against_each_dense_baseline_of_the_same_mode():
    """The report states packed / dense back to back for every pair measured: packed-compiled
    against both compiled fp16 rows (NCHW and channels-last parameters), eager against eager; a
    missing row gives no ratio, and nothing is compared across execution modes."""
    from quantsd.bench.core import packed_ratios

    def row(name, ms):
        return {"config": name, "unet_ms_pipelined": ms}

    rows = [row("fp16-sdpa", 24.0), row("packed", 30.0), row("fp16-sdpa-compiled", 7.12),
            row("fp16-sdpa-compiled-cl", 6.30), row("packed-compiled", 7.42), row("fp32-classic", 90.0)]
    got = {(p, d): round(r, 4) for p, d, r in packed_ratios(rows)}
    assert got == {("packed", "fp16-sdpa"): 1.25, ("packed-compiled", "fp16-sdpa-compiled"): round(7.42 / 7.12, 4),
                   ("packed-compiled", "fp16-sdpa-compiled-cl"): round(7.42 / 6.30, 4)}
    assert packed_ratios([row("packed-compiled", 7.4), row("fp16-sdpa-compiled-cl", None)]) == []
    res = {"meta": {"model": "m"}, "configs": [
        {"name": "fp16-sdpa-compiled-cl", "unet_ms_pipelined": {"median": 6.3}},
        {"name": "packed-compiled", "unet_ms_pipelined": {"median": 7.42}}]}
    assert "packed-compiled / fp16-sdpa-compiled-cl 1.178x" in markdown_report(res)


def test_interleaved_rounds_take_turns_and_cancel_a_drifting_host():
    """Each round times both functions, in A B / B A order; a host that slows down steadily over the
    run moves both numbers of a round alike, so the per-round ratio stays near the true one (here
    1.10) while the medians of numbers taken at different times need not."""
    from quantsd.bench.core import interleaved_rounds, paired_ratio

    order, clock = [], [0]

    def timer(fn):
        clock[0] += 1
        return fn() * (1.0 + 0.05 * clock[0])   # every call 5% slower than the one before

    fns = {"packed": lambda: order.append("packed") or 11.0, "fp16-sdpa": lambda: order.append("fp16-sdpa") or 10.0}
    rounds = interleaved_rounds(fns, rounds=4, calls=3, timer=timer)
    assert order == ["packed"] * 3 + ["fp16-sdpa"] * 6 + ["packed"] * 6 + ["fp16-sdpa"] * 6 + ["packed"] * 3
    assert [len(v) for v in rounds.values()] == [4, 4]
    pair = paired_ratio(rounds, "packed", "fp16-sdpa")
    assert pair["rounds"] == 4 and pair["ratio_min"] <= pair["ratio_median"] <= pair["ratio_max"]
    assert abs(pair["ratio_median"] - 1.10) < 0.02
    # the other way round in time (all of one, then all of the other) the drift is the whole difference
    seq = {"packed": [timer(fns["packed"]) for _ in range(4)], "fp16-sdpa": [timer(fns["fp16-sdpa"]) for _ in range(4)]}
    assert abs(paired_ratio(seq, "packed", "fp16-sdpa")["ratio_median"] - 1.10) > 0.05
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        paired_ratio({"a": [1.0], "b": []}, "a", "b")


def test_markdown_reports_the_interleaved_eager_ratio():
    from quantsd.bench.core import paired_ratio

    res = _fake_results()
    assert "taking turns" not in markdown_report(res)
    unet = {"packed": [30.0, 33.0, 29.0], "fp16-sdpa": [28.0, 30.0, 29.0]}
    image = {"packed": [2000.0], "fp16-sdpa": [2100.0]}
    res["eager_interleaved"] = {"packed_vs_fp16_sdpa": {
        "calls": 5, "unet": paired_ratio(unet, "packed", "fp16-sdpa"), "image": paired_ratio(image, "packed", "fp16-sdpa")}}
    md = markdown_report(res)
    assert "taking turns (3 rounds of 5 UNet steps, 1 of one image): UNet step 1.071x" in md
    assert "per round 1.000-1.100" in md and "fastest rounds 1.036x" in md and "image 0.952x" in md


def test_eager_pair_runs_once_both_eager_rows_built(monkeypatch, tmp_path):
    """Bench._eager_pair rebuilds fp16-sdpa and packed side by side and records the paired ratios --
    only when both eager rows were built, and only once per run; the pipelines are released after."""
    import quantsd.bench.core as core

    b = core.Bench(out_dir=tmp_path, log=lambda s: None)
    b.results = {"meta": {"model": "m"}, "configs": []}
    built, released = [], []
    monkeypatch.setattr(b, "_build", lambda cfg, dev, recipe: built.append(cfg.name) or cfg.name)
    monkeypatch.setattr(core, "_release", lambda pipe, compiled: released.append(pipe))
    seen_calls = []
    monkeypatch.setattr(core, "eager_interleaved", lambda pipes, *a, **k: seen_calls.append(k.get("calls")) or {
        "unet_ms_rounds": {"fp16-sdpa": [10.0, 12.0], "packed": [11.0, 12.0]},
        "image_ms_rounds": {"fp16-sdpa": [100.0], "packed": [90.0]}, "calls": 5})
    monkeypatch.setattr(core.torch.cuda, "empty_cache", lambda: None)
    cfgs = core.default_configs(True, True)
    b.results["configs"] = [{"name": "fp16-sdpa", "build": {"ok": True}}] + [{"name": "packed", "build": {"error": "OOM"}}]
    b._eager_pair(cfgs, None, None)          # packed not built: nothing
    assert built == [] and "eager_interleaved" not in b.results and not b._pair_done
    b.results["configs"] = [{"name": "fp16-sdpa", "build": {"ok": True}}, {"name": "packed", "build": {"ok": True}}]
    b._eager_pair(cfgs, None, None)
    assert built == ["fp16-sdpa", "packed"] and sorted(released) == ["fp16-sdpa", "packed"] and b._pair_done
    pair = b.results["eager_interleaved"]["packed_vs_fp16_sdpa"]
    assert pair["unet"]["ratio_median"] == pytest.approx((1.1 + 1.0) / 2) and pair["image"]["ratio_median"] == 0.9
    assert "taking turns (2 rounds of 5 UNet steps" in markdown_report(b.results)
    assert seen_calls == [5]      # the bench's eager_pair_calls reach the measurement
    # with packed-checked built too, it joins the same turns and is compared with both
    b._pair_done = False
    built.clear()
    monkeypatch.setattr(core, "eager_interleaved", lambda pipes, *a, **k: {
        "unet_ms_rounds": {"fp16-sdpa": [10.0, 12.0], "packed": [11.0, 12.0], "packed-checked": [10.5, 12.0]},
        "image_ms_rounds": {"fp16-sdpa": [100.0], "packed": [90.0], "packed-checked": [95.0]}, "calls": 5})
    cfgs3 = cfgs + core.optional_configs(True, True)
    b.results["configs"] = [{"name": "fp16-sdpa", "build": {"ok": True}}, {"name": "packed", "build": {"ok": True}}, {"name": "packed-checked", "build": {"ok": True}}]
    b._eager_pair(cfgs3, None, None)
    assert built == ["fp16-sdpa", "packed", "packed-checked"]
    pre = b.results["eager_interleaved"]["packed_vs_fp16_sdpa"]["packed-checked"]
    assert pre["unet"]["ratio_median"] == pytest.approx((1.05 + 1.0) / 2)
    assert pre["unet_vs_packed"]["ratio_median"] == pytest.approx((10.5 / 11 + 1.0) / 2)
    assert "packed-checked in the same turns: UNet step 1.025x fp16-sdpa, 0.977x packed, image 0.950x" \
        in markdown_report(b.results)
    b.eager_pair_rounds = 0
    b.results.pop("eager_interleaved")
    b.results["configs"] = [{"name": "fp16-sdpa", "build": {"ok": True}}, {"name": "packed", "build": {"ok": True}}]
    b._eager_pair(cfgs, None, None)
    assert "eager_interleaved" not in b.results


def test_median_ci_is_the_sign_test_interval():
    """The interval's ends are order statistics around the median: for n = 61 the 23rd and 39th
    values (P(Bin(61, 1/2) <= 22) = 0.0242 <= 0.025 < P(<= 23)); too few values give None; and a
    pair summary carries it."""
    from quantsd.bench.core import median_ci, paired_ratio

    values = [float(v) for v in range(61)][::-1]         # any order
    assert median_ci(values) == (22.0, 38.0)
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_ci([float(v) for v in range(6)]) == (0.0, 5.0)
    lo, hi = median_ci([float(v) for v in range(6)], level=0.5)
    assert 0.0 < lo <= hi < 5.0
    per_round = {"a": [1.0 + i / 100 for i in range(10)], "b": [1.0] * 10}
    s = paired_ratio(per_round, "a", "b")
    assert s["ratio_ci95"] == [1.01, 1.08] and s["ratio_ci95"][0] <= s["ratio_median"] <= s["ratio_ci95"][1]


def test_bench_sdpa_backend_applies_where_a_configuration_names_none():
    """quantsd bench --sdpa-backend X: every configuration on the default ("auto") takes X; the
    variants that name a backend keep theirs; the report header says so; a bad name is refused."""
    from quantsd.bench.configs import with_sdpa_backend
    from quantsd.bench.report import markdown_report

    cfgs = default_configs(True, True) + optional_configs(True, True)
    out = with_sdpa_backend(cfgs, "cudnn")
    named = {c.name: c.sdpa_backend for c in cfgs if c.sdpa_backend != "auto"}
    assert named == {"fp16-sdpa-pytorch": "pytorch", "packed-pytorch": "pytorch",
                     "fp16-sdpa-compiled-flash": "flash", "packed-compiled-flash": "flash"}
    assert {c.name: c.sdpa_backend for c in out if c.name in named} == named
    assert all(c.sdpa_backend == "cudnn" for c in out if c.name not in named)
    assert [c.name for c in out] == [c.name for c in cfgs] and cfgs[0].sdpa_backend == "auto"   # a copy
    assert with_sdpa_backend(cfgs, "auto") == cfgs
    with pytest.raises(ValueError, match="unknown SDPA backend 'fast'"):
        with_sdpa_backend(cfgs, "fast")
    md = markdown_report({"meta": {"model": "m", "sdpa_backend": "pytorch"}, "configs": []})
    assert "SDPA backend preference pytorch" in md
    assert "SDPA backend preference" not in markdown_report({"meta": {"model": "m", "sdpa_backend": "auto"},
                                                             "configs": []})
    from quantsd.cli import main

    r = CliRunner().invoke(main, ["bench", "--sdpa-backend", "fast", "-o", "unused"])
    assert r.exit_code != 0 and "fast" in r.output


def test_eager_pair_intervals_script_recomputes_every_pair(monkeypatch, tmp_path):
    """bench/eager_pair_intervals.py: from a saved run's per-round times, every variant against
    fp16-sdpa and packed, and a packed variant against the dense one of its backend, each with the
    interval median_ci gives; a run without a pair gives nothing."""
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from eager_pair_intervals import pair_intervals

    from quantsd.bench.core import median_ci

    dense = [10.0 + i / 10 for i in range(12)]
    rounds = {"fp16-sdpa": dense, "packed": [1.02 * x for x in dense],
              "fp16-sdpa-pytorch": [1.01 * x for x in dense], "packed-pytorch": [1.03 * x for x in dense]}
    results = {"eager_interleaved": {"packed_vs_fp16_sdpa": {"unet_ms_rounds": rounds}}}
    rows = {(r["num"], r["den"]): r for r in pair_intervals(results)}
    assert set(rows) == {("packed", "fp16-sdpa"), ("fp16-sdpa-pytorch", "fp16-sdpa"), ("fp16-sdpa-pytorch", "packed"),
                         ("packed-pytorch", "fp16-sdpa"), ("packed-pytorch", "packed"),
                         ("packed-pytorch", "fp16-sdpa-pytorch")}
    assert rows[("packed", "fp16-sdpa")]["median"] == 1.02
    assert rows[("packed-pytorch", "fp16-sdpa-pytorch")]["median"] == round(1.03 / 1.01, 4)
    ratios = [1.03 * x / (1.01 * x) for x in dense]
    lo, hi = median_ci(ratios)
    assert rows[("packed-pytorch", "fp16-sdpa-pytorch")]["ci95"] == [round(lo, 4), round(hi, 4)]
    assert pair_intervals({"configs": []}) == []
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    monkeypatch.setattr(sys, "argv", ["eager_pair_intervals.py", str(path), "--out", str(tmp_path / "t.json")])
    import eager_pair_intervals

    eager_pair_intervals.main()
    assert json.loads((tmp_path / "t.json").read_text())[str(path)][0]["num"] == "packed"


def test_pipelined_step_reports_the_hosts_issue_time_per_call(monkeypatch):
    """Back to back, the host's time to issue a call is measured apart from the GPU's: each window's
    wall time until the last call returns, per call, the median of the timed windows (the warm-up
    window left out)."""
    from types import SimpleNamespace

    from quantsd.bench import core

    issue_s = iter([0.050, 0.010, 0.030, 0.020])       # one per window: warm-up, then three timed

    class SlowUNet:
        device, dtype = torch.device("cpu"), torch.float32
        calls = 0

        def __call__(self, *a, **k):
            SlowUNet.calls += 1
            if SlowUNet.calls % 4 == 1:                   # one sleep per window of 4 calls
                time.sleep(next(issue_s))

    def fake_cuda_time_ms(fn, iters, warmup):
        for _ in range(warmup + iters):
            fn()
        return {"median": 28.0, "min": 24.0, "max": 32.0, "n": iters}

    monkeypatch.setattr(core, "cuda_time_ms", fake_cuda_time_ms)
    pipe = SimpleNamespace(unet=SlowUNet(), text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=8)))
    out = core.unet_step_pipelined_ms(pipe, 64, calls=4, repeats=3)
    assert SlowUNet.calls == 16
    assert out["median"] == 7.0 and out["n"] == 3       # the GPU's per-call ms as before
    assert 20 / 4 <= out["host_issue_ms"] < 30 / 4        # the median timed window (20 ms), per call: not the warm-up's


def test_markdown_marks_a_host_bound_compiled_step():
    """The report says how long the host took to issue each compiled step back to back, and marks the
    rows where that reaches the step's own ms: their back-to-back number is the host's."""
    from quantsd.bench.report import host_issue_lines

    res = {"meta": {"model": "m"}, "configs": [
        {"name": "fp16-sdpa", "unet_ms_pipelined": {"median": 27.0, "host_issue_ms": 26.9}},
        {"name": "fp16-sdpa-compiled", "compile": True, "unet_ms_pipelined": {"median": 7.15, "host_issue_ms": 2.10}},
        {"name": "packed-compiled", "compile": True, "unet_ms_pipelined": {"median": 7.45, "host_issue_ms": 7.30}}]}
    text = markdown_report(res)
    assert ("Host time to issue a compiled UNet step back to back: fp16-sdpa-compiled 2.10 of 7.15 ms, "
            "packed-compiled 7.30 of 7.45 ms (host-bound)") in text
    assert "fp16-sdpa 26.9" not in text                  # eager steps are host-bound by design: not listed
    assert host_issue_lines(summary_rows({"configs": [{"name": "packed-compiled", "compile": True,
                                                       "unet_ms_pipelined": {"median": 7.4}}]})) == []
