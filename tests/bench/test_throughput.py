"""`python -m mobajax.bench throughput` end to end on a tiny config, transformers baseline included."""

import json

from mobajax.bench import throughput

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5, max_position_embeddings=256,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def test_workload_is_reproducible_and_in_range():
    prompts, outputs = throughput.workload(3, 20, 5, 9, 97)
    assert (prompts, outputs) == throughput.workload(3, 20, 5, 9, 97)
    assert all(5 <= len(p) <= 9 and max(p) < 97 for p in prompts) and all(5 <= n <= 9 for n in outputs)


def test_throughput_bench_with_transformers_baseline(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    args = ["--shape", str(config), "--dtype", "float32", "--num-prompts", "5", "--min-len", "4", "--max-len", "12",
            "--decode-batch", "3", "--decode-prompt", "8", "--decode-output", "6", "--hf", "--hf-requests", "4",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--out", str(tmp_path / "out")]
    assert throughput.main(args) == 0
    result = json.loads((tmp_path / "out" / "throughput.json").read_text())
    _, outputs = throughput.workload(0, 5, 4, 12, 97)
    assert result["throughput"]["requests"] == 5
    assert abs(result["throughput"]["output_tok_s"] * result["throughput"]["seconds"] - sum(outputs)) < 1e-6
    hf = result["transformers"]
    assert hf["workload_requests"] == 4 and hf["workload_output_tok_s"] > 0 and hf["output_tok_s"] > 0
    assert result["workload_speedup_vs_transformers"] > 0 and result["decode_speedup_vs_transformers"] > 0
    assert 0 < result["fraction_of_floor"]
    for workload in ("throughput", "decode"):
        w = result[workload]
        phases = w["phase_seconds"]
        assert set(phases) == {"schedule", "inputs", "device", "outputs"} and min(phases.values()) > 0
        assert sum(phases.values()) <= w["seconds"] and w["device_fraction"] == phases["device"] / w["seconds"]
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 0
    assert "transformers generate, throughput workload (first 4 requests" in capsys.readouterr().out
