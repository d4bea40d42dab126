"""bench/gpu_bench.py's dry run: the tiny SDXL model on CPU, end to end through the worker's request queue, run as
the GPU machine runs it (a separate process writing JSON lines), with the fewest runs and denoising steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_a_line_per_step(tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="the benchmark needs the [worker] extra")
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bench", "--dry-run", "--quick", "--runs", "1", "--warmup", "1",
         "--inference-steps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [line["step"] for line in lines]

    versions = lines[0]
    assert versions["step"] == "versions"
    assert {"python", "torch", "cuda", "diffusers", "transformers", "triton", "torchao"} <= set(versions["versions"])
    assert lines[1]["step"] == "build" and lines[1]["status"] == "ok" and lines[1]["vae_force_upcast"] is True
    assert steps[-1] == "done"
    for step in ("a_eager_pairs", "b_phases", "c_compile_default", "d_compile_reduce_overhead", "e_fp8",
                 "f_throughput", "g_fresh_process", "g_fresh_process_child"):
        assert step in steps, step
    assert all(line["status"] in ("ok", "skipped") for line in lines), [x for x in lines if x["status"] == "error"]
    assert all(line.get("reason") for line in lines if line["status"] == "skipped")

    stock, fast = [line for line in lines if line["step"] == "a_eager_pairs"]
    assert stock["variant"] == "stock" and fast["variant"] == "fast_eager"
    assert stock["runs"] == fast["runs"] == 1 and stock["p50_s"] > 0
    assert fast["latent_rel_err"] < 1e-3 and fast["pixel_diff_mean"] <= 2.0 and fast["nan"] is False

    phases = next(line for line in lines if line["step"] == "b_phases")["phases"][0]
    for phase in ("text_encoder", "text_encoder_2", "vae_encode", "unet", "vae_decode", "safety_input",
                  "safety_output", "jpeg_encode"):
        assert phases[phase]["calls"] >= 1, phase

    compiled = [line for line in lines if line["step"] in ("c_compile_default", "d_compile_reduce_overhead")]
    assert all(line["status"] == "skipped" for line in compiled)
    throughput = next(line for line in lines if line["step"] == "f_throughput")
    assert throughput["concurrent_4_images_per_s"] > 0 and throughput["num_images_4_images_per_s"] > 0
    child = next(line for line in lines if line["step"] == "g_fresh_process_child")
    assert child["first_result_from_process_start_s"] >= child["first_request_s"] > 0
