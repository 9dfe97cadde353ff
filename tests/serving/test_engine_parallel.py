"""The engine sharded over 8 fake CPU devices (tensor and expert parallel) gives the outputs of one
device. jax fixes its device count at start, so the check runs in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK = textwrap.dedent(
    """
    import sys, tempfile
    import jax
    assert len(jax.devices()) == 8
    from mobajax.models import MobaConfig, load_pretrained, with_moba
    from mobajax.serving.config import EngineConfig
    from mobajax.serving.engine import LLMEngine
    from mobajax.serving.sampling_params import SamplingParams
    from tests.models.hf_checkpoints import make_checkpoint
    from tests.models.test_moe import make_moe_checkpoint

    def outputs(model, **parallel):
        engine = LLMEngine(model, EngineConfig(page_size=8, max_num_seqs=4, max_num_batched_tokens=16,
                                               warmup=False, decode_steps=4, **parallel))
        prompts = [[5, 9, 17, 33, 2, 7, 81, 14, 3, 60, 21], [44, 3, 12], list(range(20, 45))]
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        if parallel:  # k/v pages and key sums alike
            devices = engine.config.tensor_parallel_size * engine.config.expert_parallel_size
            assert all(len(pool.sharding.device_set) == devices for pool in jax.tree.leaves(engine.runner.pools))
        return [done[str(i)].outputs[0].token_ids for i in range(3)]

    dense = tempfile.mkdtemp()
    make_checkpoint(dense, "llama", tied=False)
    model = load_pretrained(dense)
    assert outputs(model, tensor_parallel_size=2) == outputs(model)
    moba = with_moba(model, MobaConfig(block_size=8, top_k=2, full_attention_layers=(0,)))
    assert outputs(moba, tensor_parallel_size=2) == outputs(moba)
    try:
        outputs(model, tensor_parallel_size=16)
    except ValueError as err:
        assert "needs 16 devices, found 8" in str(err), err
    else:
        raise AssertionError("16 devices accepted")
    moe = tempfile.mkdtemp()
    make_moe_checkpoint(moe, "qwen2_moe")
    model = load_pretrained(moe)
    assert outputs(model, tensor_parallel_size=2, expert_parallel_size=2) == outputs(model)
    print("PARALLEL OK")
    """
)


@pytest.mark.slow
def test_tensor_and_expert_parallel_engine_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "PARALLEL OK" in result.stdout, result.stderr[-3000:]


def test_serve_flags_reach_the_engine_config(capsys):
    from mobajax.serve import parse_args

    _, config = parse_args(["--tensor-parallel-size", "2", "--expert-parallel-size", "4"])
    assert (config.tensor_parallel_size, config.expert_parallel_size) == (2, 4)
    with pytest.raises(SystemExit):
        parse_args(["--tensor-parallel-size", "0"])
    assert "--tensor-parallel-size" in capsys.readouterr().err
