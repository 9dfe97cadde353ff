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
