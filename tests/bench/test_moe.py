"""`python -m mobajax.bench moe --smoke` on the CPU: the decode floor counts the experts routed to;
the expert-parallel part runs on fake devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobajax.bench import moe

ROOT = Path(__file__).resolve().parents[2]


def test_decode_floor_counts_routed_experts(tmp_path):
    assert moe.main(["--smoke", "--only", "decode", "--layers", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "moe.json").read_text())["rows"]
    one, four = (r for r in rows if r["kernel"] == "decode_step")
    assert one["experts_read_fraction"] == pytest.approx(2 / 8)  # one token: its top-2 of 8 experts
    assert 2 / 8 <= four["experts_read_fraction"] <= 1 and four["floor_ms"] > one["floor_ms"] > 0
    assert one["xla_ms"] > 0 and (tmp_path / "moe.png").exists()


def test_needs_a_gpu_without_smoke(capsys):
    assert moe.main(["--only", "decode"]) == 2
    assert "--smoke runs on CPU" in capsys.readouterr().out


def test_expert_parallel_on_two_cpu_devices(tmp_path):
    """`--only ep` on two fake CPU devices: both layouts run and agree."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    argv = ["--smoke", "--only", "ep", "--layers", "2", "--out", str(tmp_path)]
    code = f"from mobajax.bench import moe; raise SystemExit(moe.main({argv!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "moe.json").read_text())["rows"]
    assert row["kernel"] == "expert_parallel" and "2 devices" in row["case"]
    assert row["rel_err"] < 2e-2 and row["speedup"] > 0 and row["one_device_tok_s"] > 0


def test_expert_parallel_needs_two_devices(tmp_path, capsys):
    assert moe.main(["--smoke", "--only", "ep", "--layers", "1", "--out", str(tmp_path)]) == 0
    assert "needs >= 2 devices" in capsys.readouterr().out


def test_expert_decode_rows_against_the_floor(tmp_path):
    assert moe.main(["--smoke", "--only", "experts", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "moe.json").read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["expert_decode"] * 2
    for row in rows:
        assert row["floor_us"] > 0 and row["decode_us"] > 0 and row["grouped_us"] > 0
        assert row["decode_rel_err"] < 2e-2 and row["decode_config"]["block_f"] > 0


def test_time_decode_feeds_each_call_the_previous_caches():
    seen = []

    def step(params, token, position, caches):
        seen.append(caches)
        return caches * 1.0, caches + 1

    assert moe.time_decode(step, None, None, None, 0, iters=2, reps=2) > 0
    assert seen == list(range(len(seen))) and len(seen) == 5  # warm-up + 2 x 2


def test_chained_steps_equal_single_steps():
    """The engine-style chain of decode steps in one call computes what the steps do one by one."""
    import jax
    import numpy as np

    from mobajax.models.llama import Decoder

    config = moe.qwen3_30b_config(2, "xla", smoke=True)
    module = Decoder(config, moe.DTYPE)
    params = moe.random_params(module)
    token, inputs, pools = moe.paged_decode_inputs(config, 2, 20)
    total, want = 0.0, pools
    for _ in range(3):
        logits, want = moe.paged_step(module, params, token, inputs, want)
        total += float(logits[0, 0])
    acc, got = moe.chained_steps(module, 3)(params, token, inputs, moe.paged_decode_inputs(config, 2, 20)[2])
    assert float(acc) == pytest.approx(total, rel=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # bf16: one jit vs op by op
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)
    assert np.abs(np.asarray(jax.tree.leaves(want)[0], np.float32)).sum() > 0  # the steps wrote K/V
