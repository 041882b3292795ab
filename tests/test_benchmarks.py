"""Smoke runs of the benchmark programs on the CPU, and their README tables against recorded runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tilemoe

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                         text=True, encoding="utf-8", timeout=300)
    if check:
        assert out.returncode == 0, f"{script} {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.parametrize("script", ["bench_moe_variants.py", "tune_triton.py", "moe_journey.py", "throughput.py"])
def test_help(script):
    assert "usage:" in run(script, "--help").stdout


def test_variants_on_the_cpu_check_and_time_every_runnable_variant(tmp_path):
    # Under the interpreter (tests/conftest.py) the triton variants run too, slowly: 2 tokens.
    # --energy asks for joules, which a CPU has no counter of: the columns stay empty.
    out = run("bench_moe_variants.py", "--tokens", "2", "--variants", "torch", "grouped_mm", "triton",
              "grouped_mm graphed", "dense floor", "weights read", "--energy", "--plot", str(tmp_path / "v.png")).stdout
    for variant in ("torch", "grouped_mm", "triton", "dense floor", "weights read"):
        assert re.search(rf"^\s+2\s+{re.escape(variant)}\s+\d", out, re.M), variant
    assert out.count("PASS") >= 3 and "FAIL" not in out
    assert "skipped grouped_mm graphed: CUDA graphs need a CUDA GPU" in out
    assert (tmp_path / "v.png").stat().st_size > 0


def test_wrong_preset_and_tokens_are_named():
    bad = run("bench_moe_variants.py", "--preset", "gpt-9", check=False)
    assert bad.returncode != 0 and "preset: expected one of" in bad.stderr
    bad = run("bench_moe_variants.py", "--tokens", "0", check=False)
    assert bad.returncode == 2 and "--tokens: expected ints >= 1, got [0]" in bad.stderr


def test_tune_says_it_needs_a_gpu():
    assert "no CUDA GPU here" in run("tune_triton.py").stdout
    assert "no CUDA GPU here" in run("tune_triton.py", "--backward").stdout
    bad = run("tune_triton.py", "--record", check=False)
    assert bad.returncode == 2 and "--record: records the --backward sweep" in bad.stderr


def test_tune_replaces_the_rows_it_measured_and_keeps_the_rest(tmp_path):
    tune = load("tune_triton.py")
    path = tmp_path / "gpu.json"
    assert tune.merged(path, [{"preset": "a", "tokens": 1, "projection": "up", "ms": 1}]) == [
        {"preset": "a", "tokens": 1, "projection": "up", "ms": 1}]
    old = [{"preset": "a", "tokens": 1, "projection": "up", "ms": 1}, {"preset": "a", "tokens": 1, "projection": "down", "ms": 2},
           {"preset": "b", "tokens": 64, "projection": "up", "ms": 3}]
    path.write_text(json.dumps({"gpu": "x", "configs": old}))
    new = [{"preset": "a", "tokens": 1, "projection": "down", "ms": 5}, {"preset": "c", "tokens": 1, "projection": "up", "ms": 6}]
    assert [row["ms"] for row in tune.merged(path, new)] == [1, 5, 3, 6]


def test_tune_backward_check_catches_a_wrong_weight_gradient():
    # The --backward sweep checks each candidate's dW_e = A_e^T B_e (rows read through the
    # permutation) on every expert before timing it: right passes, one wrong element fails.
    tune = load("tune_triton.py")
    x = torch.randn(40, 8, dtype=torch.float64)
    routing = tilemoe.route(torch.randn(40, 4, dtype=torch.float64), 2)
    p_act = torch.randn(80, 6, dtype=torch.float64)
    gather = routing.sorted_tokens
    offsets = routing.offsets.tolist()
    out = torch.stack([x[gather[offsets[e]:offsets[e + 1]]].t() @ p_act[offsets[e]:offsets[e + 1]] for e in range(4)])
    assert tune.wgrad_error(out, x, p_act, routing, a_gather=gather) < 1e-5  # torch side in fp32
    biggest = max(range(4), key=lambda e: offsets[e + 1] - offsets[e])
    out[biggest, 3, 2] += 1.0
    assert tune.wgrad_error(out, x, p_act, routing, a_gather=gather) > 1e-3


def test_table_from_a_record(tmp_path):
    record = {"gpu": "Some GPU", "device": "Some GPU", "torch": "2.x", "triton": "3.x", "dtype": "torch.bfloat16",
              "commit": "0123456789", "command": "bench_moe_variants.py", "date": "2026-01-01T00:00:00", "copy_gbps": 4000.0,
              "baseline": "grouped_mm", "rows": [
                  {"preset": "small", "tokens": 8, "variant": "grouped_mm", "ms": 2.0, "vs grouped_mm": 1.0, "% of floor": 25.0},
                  {"preset": "small", "tokens": 8, "variant": "triton", "ms": 1.0, "vs grouped_mm": 2.0, "% of floor": 50.0},
                  {"preset": "small", "tokens": 8, "variant": "dense floor", "ms": 0.5, "vs grouped_mm": 4.0, "% of floor": 100.0},
              ]}
    path = tmp_path / "moe_variants-x.json"
    path.write_text(json.dumps(record))
    out = run("bench_moe_variants.py", "--table", str(path)).stdout
    assert "| tokens | grouped_mm | triton | floor ms | triton % of floor |" in out
    assert "| 8 | 2.000 (1.00x) | 1.000 (2.00x) | 0.500 | 50% |" in out
    assert out.strip().endswith("<!-- end of generated tables -->")
    missing = run("bench_moe_variants.py", "--table", str(tmp_path / "nope.json"), check=False)
    assert missing.returncode == 2 and "--table: FileNotFoundError" in missing.stderr
    # With SonicMoE in the run: the chapter's layer against it, in the same run (its ms over ours).
    record["rows"].insert(2, {"preset": "small", "tokens": 8, "variant": "sonicmoe", "ms": 1.5, "vs grouped_mm": 4 / 3,
                              "% of floor": 100 / 3})
    path.write_text(json.dumps(record))
    out = run("bench_moe_variants.py", "--table", str(path)).stdout
    assert "| tokens | grouped_mm | triton | sonicmoe | triton vs sonicmoe | floor ms | triton % of floor |" in out
    assert "| 8 | 2.000 (1.00x) | 1.000 (2.00x) | 1.500 (1.33x) | 1.50x | 0.500 | 50% |" in out
    assert "'vs sonicmoe'" not in out  # the caption explains the ratio only where there are two SonicMoE rows
    # With SonicMoE's own module too: the ratio is to the faster of the two SonicMoE rows.
    record["rows"].insert(3, {"preset": "small", "tokens": 8, "variant": "sonicmoe module", "ms": 1.25,
                              "vs grouped_mm": 1.6, "% of floor": 40.0})
    path.write_text(json.dumps(record))
    out = run("bench_moe_variants.py", "--table", str(path)).stdout
    assert "| tokens | grouped_mm | triton | sonicmoe | sonicmoe module | triton vs sonicmoe | floor ms |" in out
    assert "| 8 | 2.000 (1.00x) | 1.000 (2.00x) | 1.500 (1.33x) | 1.250 (1.60x) | 1.25x | 0.500 | 50% |" in out
    assert "'vs sonicmoe': the faster SonicMoE row's ms over the layer's" in out
    assert "SM clock while timed" not in out  # a run recorded before tilemoe.clocks sampled anything
    # A run that sampled the clock: one line per token count under the preset's table.
    for row, (mhz, capped) in zip(record["rows"], [(1965, 0.0), (1575, 1.0), (1600, 0.5), (1700, 0.25), (1500, 1.0)]):
        row.update(sm_clock_mhz=mhz, power_capped=capped, power_limit_w=700, max_sm_clock_mhz=1980)
    path.write_text(json.dumps(record))
    out = run("bench_moe_variants.py", "--table", str(path)).stdout
    assert ("SM clock while timed, MHz (at most 1980), and in parentheses the share of samples in which the 700 W "
            "power cap held it down:") in out
    assert ("- 8 tokens: grouped_mm 1965 (0%), triton 1575 (100%), sonicmoe 1600 (50%), sonicmoe module 1700 (25%), "
            "dense floor 1500 (100%)") in out
    assert "Run back to back" not in out  # a run without --energy
    # A run with --energy: joules per forward, mean power and the time per call, run back to back.
    for row, (joules, watts) in zip(record["rows"], [(1.2, 600.0), (0.7, 700.0), (1.05, 690.0), (0.875, 700.0), (0.35, 700.0)]):
        row.update(energy_j=joules, power_w=watts, loop_ms=joules / watts * 1e3)
    path.write_text(json.dumps(record))
    out = run("bench_moe_variants.py", "--table", str(path)).stdout
    assert ("Run back to back for 1.5 s (no cache flush between calls; NVML's energy counter): the joules per forward, "
            "the board's mean power and the time per call. At the 700 W limit a call takes at least its joules over "
            "700 W:") in out
    assert ("- 8 tokens: grouped_mm 1.2 J at 600 W, 2.000 ms, triton 0.7 J at 700 W, 1.000 ms, sonicmoe 1.05 J at "
            "690 W, 1.522 ms, sonicmoe module 0.875 J at 700 W, 1.250 ms, dense floor 0.35 J at 700 W, 0.500 ms") in out
    assert out.index("SM clock while timed") < out.index("Run back to back")


@pytest.mark.parametrize("script", ["bench_moe_variants.py", "moe_journey.py", "throughput.py", "bench_grouped_gemm.py",
                                    "bench_io_overlap.py"])
def test_readme_tables_are_generated_from_the_recorded_runs(script):
    # Every block the README says a script generated is exactly what its --table prints for those files.
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    begin = f"<!-- generated by: python benchmarks/{script} --table "
    assert begin in readme, f"benchmarks/README.md has no block generated by {script}"
    for block in readme.split(begin)[1:]:
        files = block.split(" -->", 1)[0].split()
        out = run(script, "--table", *files).stdout
        assert out.strip() in readme, f"benchmarks/README.md's block of {files} differs from {script} --table's output"


def test_journey_runs_every_level_this_machine_can_and_says_why_not_the_others(tmp_path):
    # Under the interpreter (tests/conftest.py) levels 2, 3 and 7 run their Triton kernels too.
    out = run("moe_journey.py", "--tokens", "16", "--naive-tokens", "8", "--plot", str(tmp_path / "j.png")).stdout
    for level, technique in ((0, "naive"), (1, "batched"), (2, "fused"), (3, "memory-efficient"), (4, "grouped"),
                             (7, "tilemoe triton")):
        assert re.search(rf"^\s+{level}\s+{re.escape(technique)}\s+\d", out, re.M), technique
    assert "timed on 8 tokens, scaled to 16" in out and "FAIL" not in out
    assert "skipped level 5 CUDA graphs at T=16: CUDA graphs need a CUDA GPU" in out
    assert (tmp_path / "j.png").stat().st_size > 0


def test_journey_guards_the_batched_levels_memory():
    out = run("moe_journey.py", "--tokens", "16", "--levels", "0", "1", "4", "--max-gb", "0.001").stdout
    assert re.search(r"skipped level 1 batched at T=16: would need 0\.\d+ GB of gathered weights \(over --max-gb 0.001\)", out)
    assert re.search(r"^\s+4\s+grouped\s+\d", out, re.M)
    bad = run("moe_journey.py", "--levels", "9", check=False)
    assert bad.returncode == 2 and "--levels" in bad.stderr


def load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_models_every_preset_without_a_gpu():
    out = run("throughput.py", "--hardware", "h100", "--num-gpus", "8").stdout
    assert "modelled (roofline, an upper bound): NVIDIA H100 SXM. Source: NVIDIA H100" in out
    assert "MoE layers only (attention, dense FFNs, embeddings left out)" in out
    assert "data-parallel model, efficiency 0.9" in out
    for preset, model in (("small", "small"), ("medium", "olmoe-1b-7b"), ("large", "deepseek-v3")):
        assert re.search(rf"^{preset}\s+{model}\s+modelled\s+\d", out, re.M), preset
    bad = run("throughput.py", "--scaling-efficiency", "0", check=False)
    assert bad.returncode == 2 and "--scaling-efficiency: expected a number in (0, 1], got 0.0" in bad.stderr


def test_throughput_roofline_and_economics_by_hand():
    tp = load("throughput.py")
    h200, cfg = tp.HARDWARE["h200"], tilemoe.get_preset("olmoe-1b-7b")
    # 16384 tokens: compute-bound, 6*T*K*H*I FLOPs at 989 TFLOP/s
    assert abs(tp.modelled_layer_ms(cfg, 16384, h200) - 6 * 16384 * 8 * 2048 * 1024 / 989e12 * 1e3) < 1e-9
    # one token: memory-bound, K experts' weights (+ tiny activations) at 4.8 TB/s
    one = (8 * 3 * 2048 * 1024 + 2 * 2048 + 2 * 8 * 1024) * 2 / 4.8e12 * 1e3
    assert abs(tp.modelled_layer_ms(cfg, 1, h200) - one) < 1e-12
    args = argparse.Namespace(num_gpus=4, scaling_efficiency=0.5, target_tokens_per_day=1e9, cost_tokens=3.6e9,
                              usd_per_gpu_hour=2.0)
    e = tp.economics(1.0, cfg, 1000, args)          # 16 layers x 1 ms = 16 ms per 1000 tokens
    assert e["tokens/s per GPU"] == pytest.approx(62500)
    assert e["tokens/day on 4 GPU(s)"] == pytest.approx(62500 * 86400 * 4 * 0.5)
    assert e["GPUs for target"] == math.ceil(1e9 / (62500 * 86400 * 0.5))
    assert e["GPU-hours for N tokens"] == pytest.approx(3.6e9 / (62500 * 0.5) / 3600)
    assert e["USD for N tokens"] == pytest.approx(2 * e["GPU-hours for N tokens"])


def test_throughput_and_journey_tables_from_records(tmp_path):
    from tilemoe import bench

    tp = load("throughput.py")
    cfg = tilemoe.get_preset("small")
    args = argparse.Namespace(num_gpus=2, scaling_efficiency=0.9, target_tokens_per_day=1e9, cost_tokens=1e9,
                              usd_per_gpu_hour=1.5)
    rows = [{"preset": "small", "model": "small", "how": "modelled", "moe layers": 4, **tp.economics(2.0, cfg, 1000, args)}]
    extra = {"tokens": 1000, "num_gpus": 2, "scaling_efficiency": 0.9, "target_tokens_per_day": 1e9,
             "cost_tokens": 1e9, "usd_per_gpu_hour": 1.5, "measured": False, "hardware": tp.HARDWARE["b200"]}
    path = bench.record("throughput", rows, "cpu", out_dir=tmp_path, extra=extra)
    out = run("throughput.py", "--table", str(path)).stdout
    assert "modelled from NVIDIA B200 (HGX, 1000 W) (NVIDIA HGX B200 datasheet" in out
    assert "| small | small | modelled | 4 | 2 | 1.25e+05 | 1.944e+10 |" in out  # 1000 tokens / (4 x 2 ms); x 86400 x 2 x 0.9

    journey = [{"preset": "small", "tokens": 8, "level": 0, "technique": "naive", "ms": 4.0, "tflops": 1e-3,
                "peak_gb": None, "rel_error": 1e-7, "check": "PASS", "note": "timed on 4 tokens, scaled to 8",
                "vs level 0": 1.0, "vs previous": None},
               {"preset": "small", "tokens": 8, "level": 4, "technique": "grouped", "ms": 1.0, "tflops": 4e-3,
                "peak_gb": 0.5, "rel_error": 1e-7, "check": "PASS", "note": "", "vs level 0": 4.0, "vs previous": 4.0}]
    path = bench.record("moe_journey", journey, "cpu", out_dir=tmp_path,
                        extra={"preset": cfg.as_dict(), "dtype": "torch.float32", "tokens": [8],
                               "skipped": {"5 CUDA graphs at T=8": "CUDA graphs need a CUDA GPU"}})
    out = run("moe_journey.py", "--table", str(path)).stdout
    assert "| 0 | naive | 4.000 | 1.00 | - | 0.001 | - | timed on 4 tokens, scaled to 8 |" in out
    assert "| 4 | grouped | 1.000 | 4.00 | 4.00 | 0.004 | 0.50 |  |" in out
    assert "Skipped level 5 CUDA graphs: CUDA graphs need a CUDA GPU." in out
