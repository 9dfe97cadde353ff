"""`mobajax.bench profile`: the trace summary on a hand-made trace, and the CPU refusal."""

import pytest

from mobajax.bench import profile


def trace(*kernels, host=(("host op", 0.0, 100.0),)):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    gpu = [{"ph": "X", "pid": 1, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    cpu = [{"ph": "X", "pid": 2, "name": n, "ts": t, "dur": d} for n, t, d in host]
    return {"traceEvents": meta + cpu + gpu}


def test_summary_of_kernels_gaps_and_overlap():
    # two decode steps: gemm 10 + attn 5 each, a 20 us gap, and a copy overlapping the second gemm
    events = trace(("gemm", 0, 10), ("attn", 10, 5), ("gemm", 35, 10), ("copy", 40, 10), ("attn", 50, 5))
    kernels = profile.gpu_kernels(events)
    assert [k[2] for k in kernels] == ["gemm", "attn", "gemm", "copy", "attn"]  # host events left out
    s = profile.summarize(kernels, decode_steps=2)
    assert s["span_us"] == 55 and s["busy_us"] == 35 and s["busy_fraction"] == pytest.approx(35 / 55)
    assert s["kernels"][0] == ["gemm", 10.0, 1.0] and s["kernels"][1] == ["attn", 5.0, 1.0]
    assert s["launches_per_step"] == 2.5 and s["gaps"][0] == [20, "attn", "gemm"]


def test_summary_needs_gpu_kernels():
    with pytest.raises(ValueError, match="no GPU kernels"):
        profile.summarize(profile.gpu_kernels(trace()), decode_steps=1)


def test_refuses_to_run_without_a_gpu(capsys):
    assert profile.main(["--batch", "2"]) == 2
    assert "needs a GPU" in capsys.readouterr().out


def test_bad_arguments_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--batch", "0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_drives_the_engine_end_to_end_with_a_stand_in_trace(tmp_path, monkeypatch, capsys):
    """The whole run on a tiny config (CPU): the engine decodes, the trace is taken, and the summary,
    JSON and PNG are written; only the GPU kernels are stood in for (a CPU trace has none)."""
    import json

    import jax

    from tests.bench.test_throughput import TINY

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(profile, "gpu_kernels", lambda trace: [(0.0, 30.0, "gemm"), (40.0, 10.0, "attn")])
    args = ["--shape", str(config), "--dtype", "float32", "--batch", "3", "--prompt", "8", "--decode-steps", "2",
            "--timed-calls", "2", "--traced-calls", "2", "--out", str(tmp_path / "out")]
    assert profile.main(args) == 0
    result = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert result["traced_decode_steps"] == 4 and result["batch"] == 3 and result["context"] > 8
    assert result["untraced_ms_per_step"] > 0 and result["kernels"][0] == ["gemm", 7.5, 0.25]
    assert (tmp_path / "out" / "profile.png").stat().st_size > 0
    assert "GPU busy 80.0%" in capsys.readouterr().out
