"""`python -m mobajax.bench moe --smoke` on the CPU: the decode floor counts the experts routed to."""

import json

import pytest

from mobajax.bench import moe


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
