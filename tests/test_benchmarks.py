"""Benchmarks stay runnable: each runs in-process in its tiny mode (no timing thresholds)."""

from __future__ import annotations

import json
import math

from benchmarks import gpu


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_gpu_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu.main(["--tiny", "--device", "cpu", "--peak-tflops", "0.05", "--json", str(out)])
    res = json.loads(out.read_text())
    assert "NP-DPO training step" in capsys.readouterr().out

    env = res["env"]
    assert env["torch"] and env["device"] == "cpu" and env["peak_source"] == "--peak-tflops"
    assert all(_positive(res["model"][k]) for k in ("n_params", "n_trainable", "frozen_matmul", "lora", "head"))

    # every default configuration was measured, each with finite positive numbers
    train = res["train"]
    assert {(r["precision"], r["grad_ckpt"], r["reference"]) for r in train} == {
        (p, g, r) for p in ("amp", "bf16") for g in (False, True) for r in ("cached", "recompute")}
    for r in train:
        assert "error" not in r, r
        for k in ("step_s", "tokens_per_s", "flops_per_step", "achieved_tflops", "mfu", "mfu_6n", "peak_mem_mb"):
            assert _positive(r[k]), (r["name"], k, r[k])
        assert r["tokens_per_step"] == r["sequences"] * r["seq_len"]
    by = {(r["grad_ckpt"], r["reference"]): r for r in train if r["precision"] == "bf16"}
    assert by[False, "recompute"]["flops_per_step"] > by[False, "cached"]["flops_per_step"]

    gen = res["generate"]
    assert [r["batch"] for r in gen] == [1, 8, 32]
    for r in gen:
        assert "error" not in r, r
        for k in ("call_s", "tokens_per_s", "ms_per_step", "peak_mem_mb"):
            assert _positive(r[k]), (r["name"], k, r[k])


def test_gpu_flops_and_peak_table():
    mc = gpu.ModelCounts(n_params=0, n_trainable=0, frozen_matmul=1000, lora=10, head=500, n_layers=2,
                         attn_width=8, weights_mb=0.0)
    f = gpu.step_flops(mc, n_seqs=2, seq_len=4, scored=3, recompute_reference=False)
    attn = 2 * 2.0 * 2 * 8 * 4 * 5
    assert f.forward == 2 * 1000 * 8 + 2 * 10 * 8 + attn + 2 * 500 * 3
    assert f.backward == 2 * 1000 * 8 + 4 * 10 * 8 + 2 * attn + 2 * 500 * 3
    assert f.reference == 0 and f.six_n == 6 * 1510 * 8
    assert gpu.step_flops(mc, 2, 4, 3, True).reference == 2 * 1000 * 8 + attn + 2 * 500 * 3
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == (989.4, "H100 SXM")
    assert gpu.peak_bf16_tflops("NVIDIA H100 PCIe")[1] == "H100 PCIe"
    assert gpu.peak_bf16_tflops("NVIDIA H200")[1] == "H200 SXM"
    assert gpu.peak_bf16_tflops("NVIDIA GH200 480GB")[1].startswith("GH200")
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert gpu.peak_bf16_tflops("NVIDIA L4")[0] == 121.0 and gpu.peak_bf16_tflops("NVIDIA L40S")[0] == 362.05
    assert gpu.peak_bf16_tflops("NVIDIA A10G") == (None, None)


def test_stream_benchmark_on_the_tiny_base(tmp_path, capsys):
    from pathlib import Path

    from benchmarks import stream

    base = Path(__file__).resolve().parents[1] / "assets/models/persona-tiny/base"
    out = tmp_path / "s.json"
    assert stream.main(["--base", str(base), "--tokens", "6", "--repeats", "1", "--repetition-penalty", "1.2",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["repetition_penalty"] == 1.2
    assert set(rows) == {"fp32", "bf16"} and "| bf16 |" in capsys.readouterr().out
    assert all(_positive(r["tokens_per_s"]) and _positive(r["ttft_ms"]) and r["tokens"] == 6 for r in rows.values())


def test_demo_benchmark_runs_against_the_launched_app(tmp_path):
    """benchmarks/demo.py end to end on persona-tiny: launches app.py, clicks over SSE (and in
    Chromium where it is installed), streams one generation, writes every row."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    browser = shutil.which("chromium") is not None or os.environ.get("FSA_REQUIRE_BROWSER") == "1"
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "benchmarks/demo.py", "--bundle", "assets/models/persona-tiny", "--users", "1",
           "--clicks", "3", "--streams", "1", "--no-gradio-client", "--json", str(out)]
    if not browser:
        cmd.append("--no-browser")
    r = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {row["key"]: row for row in res["rows"]}
    want = {"engine_click", "sse_choose", "ui_click", "ui_server", "sse_ttft", "sse_tok_s"}
    if browser:
        want |= {"browser_click", "browser_received", "browser_render"}
    assert want <= set(rows), sorted(rows)
    assert all(_positive(rows[k]["p50"]) for k in want)
    if browser:  # the page got the update before it finished drawing it
        assert rows["browser_received"]["p50"] < rows["browser_click"]["p50"]
    assert res["env"]["browser_cpus"] == "shared" and res["env"]["queue"]["default_concurrency_limit"] == 2
