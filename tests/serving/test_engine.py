"""LLMEngine and mobajax.LLM on a tiny random Llama with the default model's real tokenizer.

Greedy outputs of batched, chunked, preempted, prefix-cached and forked runs must equal those of
the plain KV-cached generator run one request at a time (float32).
"""

import time

import numpy as np
import pytest

import mobajax
from mobajax.generate import generate_tokens
from mobajax.models import load_pretrained
from mobajax.models.default_model import default_gguf_path
from mobajax.models.gguf_import import read_gguf
from mobajax.serving.config import EngineConfig
from mobajax.serving.engine import LLMEngine
from mobajax.serving.sampling_params import SamplingParams
from tests.models.hf_checkpoints import make_checkpoint

VOCAB = 49152
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Hello",
    "A long prompt: " + "one two three four five six seven eight nine ten " * 6,
    "Paris is the capital of",
    "def fibonacci(n):\n    return",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama whose vocabulary is SmolLM2's, saved with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_smol")
    make_checkpoint(path, "llama", tied=True, vocab_size=VOCAB, max_position_embeddings=512)
    read_gguf(default_gguf_path()).tokenizer.save_pretrained(path)
    return load_pretrained(str(path))


def engine(model, **overrides) -> LLMEngine:
    args = dict(max_num_seqs=8, max_num_batched_tokens=32, decode_steps=4, warmup=False, page_size=8)
    args.update(overrides)
    return LLMEngine(model, EngineConfig(**args))


def run(eng: LLMEngine, prompts, params) -> dict[str, list]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def token_prompts(model):
    return [model.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(model, token_prompts):
    """Greedy continuations, one request at a time, through the dense-cache generator."""
    return [list(generate_tokens(model, p, max_tokens=20, stop_ids=())) for p in token_prompts]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def outputs_of(done, n=len(PROMPTS)):
    return [done[str(i)].outputs[0].token_ids for i in range(n)]


def test_batched_chunked_greedy_equals_one_at_a_time(model, token_prompts, alone):
    eng = engine(model)
    start = time.perf_counter()
    done = run(eng, token_prompts, [GREEDY] * len(PROMPTS))
    wall = time.perf_counter() - start
    times = eng.times  # every phase of the steps is accounted for, and together they are the wall time
    assert min(times.schedule, times.inputs, times.device, times.outputs) > 0 and 0.9 * wall < times.total() <= wall
    assert outputs_of(done) == alone
    assert all(done[str(i)].outputs[0].finish_reason == "length" for i in range(len(PROMPTS)))
    assert eng.stats().num_free_pages == eng.blocks.num_pages


def test_preemption_keeps_outputs_and_frees_every_page(model, token_prompts, alone):
    eng = engine(model, num_pages=12, enable_prefix_caching=False, max_model_len=96)
    done = run(eng, token_prompts, [GREEDY] * len(PROMPTS))
    assert eng.stats().num_preemptions > 0
    assert outputs_of(done) == alone
    assert eng.blocks.num_free == eng.blocks.num_pages and all(r == 0 for r in eng.blocks.ref_counts)


def test_prefix_cache_hits_and_same_outputs(model, token_prompts, alone):
    eng = engine(model)
    first = run(eng, token_prompts[2:3], [GREEDY])
    for i in range(3):  # the same long prompt again: its full pages come from the cache
        eng.add_request(f"again{i}", token_prompts[2], GREEDY)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    stats = eng.stats()
    assert stats.prefix_cache_hits >= 3 * (len(token_prompts[2]) // 8 - 1) * 8
    assert done["again0"].num_cached_tokens > 0
    assert all(done[f"again{i}"].outputs[0].token_ids == alone[2] for i in range(3))
    assert first["0"].outputs[0].token_ids == alone[2]


def test_n_greedy_completions_share_pages_copy_on_write(model, token_prompts, alone):
    eng = engine(model)
    done = run(eng, token_prompts[:1], [SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True)])
    outs = done["0"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(o.token_ids == alone[0] for o in outs)
    assert eng.blocks.num_free == eng.blocks.num_pages


def test_seeded_sampling_is_reproducible_regardless_of_batch(model, token_prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True, n=2)
    alone = run(engine(model), token_prompts[:1], [seeded])["0"].outputs
    crowd = [SamplingParams(temperature=0.8, max_tokens=12)] * 4
    together = run(engine(model), token_prompts[:1] + token_prompts[1:], [seeded] + crowd)["0"].outputs
    assert [o.token_ids for o in alone] == [o.token_ids for o in together]
    assert alone[0].token_ids != alone[1].token_ids  # the n completions draw differently


def test_stop_strings_tokens_and_lengths(model, token_prompts, alone):
    tok = model.tokenizer
    text = tok.decode(alone[0])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    eng = engine(model)
    params = [
        SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, stop=[stop], include_stop_str_in_output=True, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[alone[0][5]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    ]
    done = run(eng, [token_prompts[0]] * 4, params)
    cut = text.index(stop)
    assert done["0"].outputs[0].text == text[:cut] and done["0"].outputs[0].stop_reason == stop
    assert done["1"].outputs[0].text == text[: cut + len(stop)]
    third = done["2"].outputs[0]
    assert third.token_ids == alone[0][: alone[0].index(alone[0][5]) + 1] and third.stop_reason == alone[0][5]
    assert done["3"].outputs[0].token_ids == alone[0][:7] and done["3"].outputs[0].finish_reason == "length"


def test_logprobs_are_raw_model_logprobs(model, token_prompts):
    eng = engine(model)
    out = run(eng, token_prompts[3:4], [SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True)])["0"]
    first = out.outputs[0].logprobs[0]
    assert out.outputs[0].token_ids[0] in first and len(first) == 5
    from mobajax.models import forward

    logits = forward(model, [token_prompts[3]])[0, -1]
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-logp)[:5]
    assert sorted(first) == sorted(int(i) for i in best)
    np.testing.assert_allclose([first[int(i)].logprob for i in best], logp[best], atol=1e-4)


def test_top_k_beyond_the_vocabulary_is_no_filter(model, token_prompts):
    eng = engine(model)
    huge = SamplingParams(temperature=1.0, top_k=1 << 40, seed=5, max_tokens=6, ignore_eos=True)
    off = SamplingParams(temperature=1.0, top_k=0, seed=5, max_tokens=6, ignore_eos=True)
    done = run(eng, token_prompts[:2], [huge, off])
    assert done["0"].outputs[0].token_ids == run(engine(model), token_prompts[:1], [off])["0"].outputs[0].token_ids


def test_abort_frees_pages(model, token_prompts):
    eng = engine(model)
    eng.add_request("a", token_prompts[2], SamplingParams(temperature=0, max_tokens=50))
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_pages
    final = eng.abort_request("a")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert eng.blocks.num_free == eng.blocks.num_pages and not eng.has_unfinished_requests()


def test_bad_requests_are_refused_with_clear_messages(model, token_prompts):
    eng = engine(model, max_model_len=64)
    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens.*requested 1\d\d tokens"):
        eng.add_request("x", token_prompts[0], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError, match=r"n \(9\) exceeds max_num_seqs \(8\)"):
        eng.add_request("z", token_prompts[1], SamplingParams(n=9))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49152\)"):
        eng.add_request("w", [VOCAB], SamplingParams())
    with pytest.raises(ValueError, match=r"min_tokens \(70\) exceeds the \d+ tokens left"):
        eng.add_request("m", token_prompts[1], SamplingParams(min_tokens=70, max_tokens=None))
    with pytest.raises(ValueError, match=r"stop_token_ids must lie in \[0, 49152\)"):
        eng.add_request("s", token_prompts[1], SamplingParams(stop_token_ids=[1 << 40]))
    with pytest.raises(ValueError, match="cannot hold one request"):
        engine(model, num_pages=2, max_model_len=64)
    assert not eng.has_unfinished_requests()


def test_llm_offline_api(model, token_prompts, alone, tmp_path):
    llm = mobajax.LLM(model=_save(model, tmp_path), max_num_seqs=4, warmup=False, page_size=8)
    outs = llm.generate(PROMPTS[:3], mobajax.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == alone[:3]
    assert outs[0].outputs[0].text == model.tokenizer.decode(alone[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="unknown engine arguments \\['max_seqs'\\]"):
        mobajax.LLM(model="default", max_seqs=3)


def _save(model, tmp_path) -> str:
    from mobajax.models import save_pretrained

    save_pretrained(model, str(tmp_path / "converted"))
    return str(tmp_path / "converted")


def test_attention_backend_choice(model, monkeypatch):
    import dataclasses

    import jax

    from mobajax.serving.engine import LLMEngine as Engine

    config = EngineConfig(warmup=False, page_size=16)
    assert Engine.attention_impl(model.config, config) == "xla"  # a CPU: the XLA paths
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert Engine.attention_impl(model.config, config) == "pallas"
    odd_heads = dataclasses.replace(model.config, head_dim=24)  # the kernels want a power of two
    assert Engine.attention_impl(odd_heads, config) == "xla"
    windowed = dataclasses.replace(model.config, layer_windows=(None, 8))
    assert Engine.attention_impl(windowed, config) == "xla"


@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_in_a_tiny_pool(model, seed):
    """Preemption, prefix caching, forks and chunked prefill together: every request completes with
    its one-at-a-time output and every page is free afterwards."""
    rng = np.random.default_rng(seed)
    base = rng.integers(100, 5000, 40).tolist()  # shared prefix for some prompts
    prompts, params = [], []
    for _ in range(8):
        own = rng.integers(100, 5000, int(rng.integers(1, 30))).tolist()
        prompts.append(base[: int(rng.integers(0, 40))] + own)
        params.append(SamplingParams(n=int(rng.integers(1, 3)), temperature=0, max_tokens=int(rng.integers(1, 16)),
                                     ignore_eos=True))
    eng = engine(model, num_pages=14, max_model_len=96, max_num_seqs=6, max_num_batched_tokens=24)
    done = run(eng, prompts, params)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        want = list(generate_tokens(model, prompt, max_tokens=p.max_tokens, stop_ids=()))
        assert [o.token_ids for o in done[str(i)].outputs] == [want] * p.n, i
    stats = eng.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # the workload exercises both
    assert eng.blocks.num_free == eng.blocks.num_pages and all(r == 0 for r in eng.blocks.ref_counts)


def test_async_scheduling_chains_decodes_without_changing_outputs(model, token_prompts, alone):
    """Chained fused decodes (dispatched before the previous call's tokens are read) give the same
    tokens as synchronous steps for greedy, seeded, stop-string, stop-token, EOS, min_tokens and
    logprob requests, and leave every page free."""
    stop = model.tokenizer.decode(alone[0])[10:13]
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=37, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[alone[3][9]], ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=33, min_tokens=30),
    ]
    results = {}
    for chained in (False, True):
        eng = engine(model, async_scheduling=chained)
        done = run(eng, token_prompts, params)
        results[chained] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in
                            (done[str(i)] for i in range(len(params)))]
        assert (eng.num_chained_decodes > 0) == chained
        assert eng.blocks.num_free == eng.blocks.num_pages and all(r == 0 for r in eng.blocks.ref_counts)
    assert results[True] == results[False]
    assert results[True][0][0][:20] == alone[0] and results[True][2][2] == "stop"


def test_abort_while_a_chained_decode_is_in_flight(model, token_prompts):
    eng = engine(model)
    for i in range(2):
        eng.add_request(str(i), token_prompts[i], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while eng._in_flight is None:
        eng.step()
    final = eng.abort_request("0")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert "0" not in done and len(done["1"].outputs[0].token_ids) == 60
    want = list(generate_tokens(model, token_prompts[1], max_tokens=60, stop_ids=()))
    assert done["1"].outputs[0].token_ids == want
    assert eng.blocks.num_free == eng.blocks.num_pages


def test_decode_tails_shorter_than_decode_steps_stay_fused(model, token_prompts):
    """Once every prompt is in, the last few tokens (fewer than decode_steps) run in the fused,
    chained decode program (over half its steps are useful) instead of one host round trip per token."""
    eng = engine(model)  # decode_steps=4
    single = []
    step = eng.runner.step
    eng.runner.step = lambda *a: single.append(1) or step(*a)
    lengths = [16, 14]  # 1 from the prefill, then 4 + 4 + 4 + (3 and 1)
    for i, n in enumerate(lengths):
        eng.add_request(str(i), token_prompts[i], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    done, after_prefill = {}, 0
    while eng.has_unfinished_requests():
        decoding = len(eng.requests) == 2 and all(s.num_generated for r in eng.requests.values() for s in r.seqs)
        before = len(single)
        done.update({o.request_id: o for o in eng.step() if o.finished})
        after_prefill += (len(single) - before) * decoding
    assert after_prefill == 0 and eng.num_chained_decodes > 0
    for i, n in enumerate(lengths):
        want = list(generate_tokens(model, token_prompts[i], max_tokens=n, stop_ids=()))
        assert done[str(i)].outputs[0].token_ids == want
    assert eng.blocks.num_free == eng.blocks.num_pages


def test_chained_decodes_go_on_as_sequences_finish(model, token_prompts):
    """Sequences ending by length or on a stop token leave the chain: the next chained call runs
    the others (fewer rows, their tokens gathered on the device) without a host round trip."""
    eng = engine(model)  # decode_steps=4
    fresh = []
    run_decode = eng._run_decode
    eng._run_decode = lambda *a: fresh.append(1) or run_decode(*a)
    full = list(generate_tokens(model, token_prompts[3], max_tokens=40, stop_ids=()))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (13, 21, 29)]
    params.append(SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[full[9]], ignore_eos=True))
    for i, p in enumerate(params):
        eng.add_request(str(i), token_prompts[i], p)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert len(fresh) == 1 and eng.num_chained_decodes >= 5
    for i, p in enumerate(params[:3]):
        want = list(generate_tokens(model, token_prompts[i], max_tokens=p.max_tokens, stop_ids=()))
        assert done[str(i)].outputs[0].token_ids == want
    stopped = done["3"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full[: full.index(full[9]) + 1]
    assert eng.blocks.num_free == eng.blocks.num_pages


def test_random_workload_async_equals_sync_on_a_tight_pool(model, token_prompts):
    """Mixed lengths, stop ids, seeds and arrivals on a pool that forces preemption: chained
    decodes (rows leaving the chain as they end) give the synchronous engine's outputs."""
    rng = np.random.default_rng(5)
    full = [list(generate_tokens(model, p, max_tokens=24, stop_ids=())) for p in token_prompts]  # stop ids
    work = []
    for i in range(12):
        j = int(rng.integers(len(token_prompts)))
        stop = [full[j][int(rng.integers(3, 20))]] if rng.random() < 0.4 else []
        temperature = 0.0 if rng.random() < 0.6 else 0.8
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=int(rng.integers(1, 40)),
                                stop_token_ids=stop, ignore_eos=True)
        work.append((int(rng.integers(0, 3)), token_prompts[j], params))  # (arrival step, prompt, params)
    results = {}
    for chained in (False, True):
        eng = engine(model, async_scheduling=chained, num_pages=12, max_model_len=96, enable_prefix_caching=False)
        done, step = {}, 0
        while step < 3 or eng.has_unfinished_requests():
            for i, (arrival, prompt, params) in enumerate(work):
                if arrival == step:
                    eng.add_request(str(i), prompt, params)
            done.update({o.request_id: o for o in eng.step() if o.finished})
            step += 1
        results[chained] = {k: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for k, o in done.items()}
        assert len(done) == len(work)
        assert eng.blocks.num_free == eng.blocks.num_pages and all(r == 0 for r in eng.blocks.ref_counts)
        if chained:
            assert eng.num_chained_decodes > 0 and eng.stats().num_preemptions > 0
    assert results[True] == results[False]


def test_warmup_compiles_the_row_gathers_of_chained_decodes(model, token_prompts):
    """After warm-up, a chain that drops finished rows compiles nothing new."""
    from mobajax.serving.model_runner import select_rows

    eng = engine(model, warmup=True, max_num_seqs=4)
    compiled = select_rows._cache_size()
    for i, n in enumerate((13, 21, 29)):
        eng.add_request(str(i), token_prompts[i], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.num_chained_decodes >= 3 and select_rows._cache_size() == compiled > 0
