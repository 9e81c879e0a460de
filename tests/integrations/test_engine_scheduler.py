"""Scheduler and engine behaviour with the fake runner (fast; the fake reads its KV back from
the paged cache, so scheduling and block bugs change outputs)."""

from __future__ import annotations

import random

import pytest
from pagedattn.integrations.engine import SamplingParams

from tests.integrations.test_engine_fakes import (
    GREEDY,
    assert_no_leak,
    make_engine,
    prompts,
    reference_greedy,
    run_all,
)


def _spy(engine):
    """Record every SchedulerOutput (and the running groups before it) of ``engine``."""
    records = []
    schedule = engine.scheduler.schedule

    def wrapped(*args, **kwargs):
        before = list(engine.scheduler.running)
        out = schedule(*args, **kwargs)
        records.append((before, out))
        return out

    engine.scheduler.schedule = wrapped
    return records


def _check_greedy(outs, ps, max_tokens=8, eos=None):
    for i, p in enumerate(ps):
        o = outs[str(i)]
        assert o.error is None, o.error
        assert o.outputs[0].token_ids == reference_greedy(p, max_tokens, eos=eos), f"request {i}"


# ------------------------------------------------------------------------- budgets and order
def test_token_budget_and_max_num_seqs_hold_every_step():
    engine = make_engine(256, max_num_batched_tokens=32, max_num_seqs=4)
    ps = prompts([5, 60, 17, 33, 2, 40, 9, 25, 12, 48])
    outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)], check_every_step=True)
    _check_greedy(outs, ps)
    assert all(s <= 4 and t <= 32 for s, t in engine.runner.steps)
    assert max(t for _, t in engine.runner.steps) == 32
    assert_no_leak(engine)


def test_chunked_prefill_splits_a_long_prompt():
    engine = make_engine(256, max_num_batched_tokens=32, max_num_seqs=32)
    ps = prompts([100])
    outs = run_all(engine, [("0", ps[0], GREEDY)])
    _check_greedy(outs, ps)
    assert [t for _, t in engine.runner.steps][:5] == [32, 32, 32, 4, 1]
    assert_no_leak(engine)


def test_mixed_batches_decode_while_a_prompt_is_chunked():
    engine = make_engine(256, max_num_batched_tokens=16, max_num_seqs=16)
    ps = prompts([4, 90])
    records = _spy(engine)
    outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)])
    _check_greedy(outs, ps)
    mixed = [out for _, out in records if out.num_decode_tokens and out.num_prefill_tokens]
    assert mixed, "no step mixed decode and prefill tokens"
    assert all(out.num_batched_tokens <= 16 for _, out in records)


def test_without_chunked_prefill_a_prompt_over_the_budget_is_an_error():
    engine = make_engine(256, max_num_batched_tokens=32, max_num_seqs=8,
                         enable_chunked_prefill=False)
    ps = prompts([10, 40, 30, 20])
    outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)])
    assert outs["1"].error and "max_num_batched_tokens" in outs["1"].error
    assert outs["1"].finished and outs["1"].outputs[0].finish_reason == "error"
    for i in (0, 2, 3):
        assert outs[str(i)].outputs[0].token_ids == reference_greedy(ps[i], 8)
    assert all(t <= 32 for _, t in engine.runner.steps)
    assert_no_leak(engine)


def test_fcfs_order():
    engine = make_engine(256, max_num_seqs=1, max_num_batched_tokens=64)
    ps = prompts([7, 3, 12, 5])
    order = []
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, GREEDY)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["0", "1", "2", "3"]


@pytest.mark.parametrize("async_scheduling, num_steps", [(False, 1), (True, 1), (True, 4)])
def test_streaming_outputs_grow_by_one_token(async_scheduling, num_steps):
    engine = make_engine(64, async_scheduling=async_scheduling, num_scheduler_steps=num_steps)
    engine.add_request("a", prompts([9])[0], SamplingParams(temperature=0, max_tokens=5))
    lengths, steps = [], 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        if not async_scheduling:
            assert len(outs) == 1  # synchronous: every step's token comes back from that step
        for out in outs:
            lengths.append(len(out.outputs[0].token_ids))
            assert out.finished == (lengths[-1] == 5)
    assert lengths == [1, 2, 3, 4, 5]  # multi-step: one output a token too, several from one call
    # async: each output one call later; 4 steps a schedule: the prompt's step, the 4 decode
    # steps from one schedule, then the call that reads them
    assert steps == {(False, 1): 5, (True, 1): 6, (True, 4): 3}[async_scheduling, num_steps]


# ----------------------------------------------------------------------------- prefix caching
def test_prefix_caching_skips_cached_blocks():
    engine = make_engine(256)
    base = prompts([48 + 7], seed=3)[0]
    other = base[:48] + prompts([11], seed=4)[0]
    records = _spy(engine)
    engine.add_request("0", base, GREEDY)
    engine.step()
    engine.add_request("1", other, GREEDY)
    engine.add_request("2", list(base), GREEDY)  # identical prompt: all but the last block
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert records[1][1].num_cached_tokens == 48 + 48
    assert records[1][1].num_prefill_tokens == 11 + 7
    assert records[1][1].num_decode_tokens == 1      # request 0 decodes in the same batch
    for rid, p in (("0", base), ("1", other), ("2", base)):
        assert outs[rid].outputs[0].token_ids == reference_greedy(p, 8)
    assert engine.block_manager.prefix_cache_hit_rate > 0.5
    assert_no_leak(engine)


def test_reset_prefix_cache_between_runs():
    engine = make_engine(256)
    p = prompts([40], seed=4)[0]
    engine.add_request("a", p, SamplingParams(temperature=0, max_tokens=30))
    engine.step()
    assert engine.reset_prefix_cache() is False  # a request is unfinished
    run_all(engine, [])
    assert engine.reset_prefix_cache() is True
    outs = run_all(engine, [("b", p, GREEDY)])
    assert outs["b"].outputs[0].token_ids == reference_greedy(p, 8)
    assert engine.metrics.summary()["prefix_cached_tokens"] == 0
    assert_no_leak(engine)


def test_prefix_hits_within_one_step_and_with_caching_off():
    ps = prompts([40], seed=5) * 3 + prompts([33], seed=6)
    for caching in (True, False):
        engine = make_engine(256, enable_prefix_caching=caching)
        outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)])
        _check_greedy(outs, ps)
        assert (engine.metrics.num_cached_tokens > 0) == caching
        assert_no_leak(engine)


@pytest.mark.parametrize("chunked", [False, True])
def test_prompts_are_hashed_on_arrival_and_allocated_with_those_hashes(chunked):
    """With prefix caching on, a prompt's blocks are hashed by add_request and every allocation within
    the prompt (a whole prompt, or its first chunk) takes those hashes; outputs stay exact."""
    engine = make_engine(256, block_size=4, max_num_batched_tokens=16 if chunked else 512,
                         enable_chunked_prefill=chunked)
    given = []
    allocate = engine.block_manager.allocate

    def spy(seq_id, token_ids, extra_keys=None, *, block_hashes=None):
        given.append((len(token_ids), None if block_hashes is None else block_hashes.num_blocks))
        return allocate(seq_id, token_ids, extra_keys, block_hashes=block_hashes)

    engine.block_manager.allocate = spy
    ps = prompts([23, 9, 23], seed=8)
    ps[2] = list(ps[0])  # a prefix hit with hashes
    outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)])
    _check_greedy(outs, ps)
    assert given and all(n is not None and n == length // 4 for length, n in given)
    # whole prompts, or (chunked, 16 tokens a step) a first chunk of the 23-token ones
    assert (sorted(length for length, _ in given) != sorted(len(p) for p in ps)) == chunked
    assert engine.metrics.num_cached_tokens > 0
    assert_no_leak(engine)


def test_a_recomputed_sequence_hits_its_own_cached_blocks():
    # One long request and a pool that forces it to be preempted: its recompute hits the cache.
    engine = make_engine(12, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    ps = prompts([20, 14])
    outs = run_all(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=16))
                            for i, p in enumerate(ps)], check_every_step=True)
    _check_greedy(outs, ps, 16)
    assert engine.scheduler.num_preemptions > 0
    assert engine.metrics.num_cached_tokens > 0
    assert_no_leak(engine)


# -------------------------------------------------------------------------------- preemption
def _workload(seed=0, n=10):
    rng = random.Random(seed)
    ps = prompts([rng.randint(1, 40) for _ in range(n)], seed=seed)
    params = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(4, 24)))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_k=20, seed=i, max_tokens=12))
        elif kind == 2:
            params.append(SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=100 + i,
                                         max_tokens=10))
        else:
            params.append(SamplingParams(use_beam_search=True, beam_width=3, max_tokens=8))
    return [(str(i), p, sp) for i, (p, sp) in enumerate(zip(ps, params))]


def _tokens(outs):
    return {rid: [c.token_ids for c in o.outputs] for rid, o in outs.items()}


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_the_same_tokens_as_an_unconstrained_run(mode):
    reqs = _workload()
    free_run = make_engine(512, block_size=4)
    expected = _tokens(run_all(free_run, reqs))
    engine = make_engine(24, block_size=4, preemption_mode=mode,
                         num_cpu_blocks=64 if mode == "swap" else 0,
                         max_num_batched_tokens=64, max_num_seqs=16)
    outs = run_all(engine, reqs, check_every_step=True)
    assert all(o.error is None for o in outs.values())
    assert _tokens(outs) == expected
    assert engine.scheduler.num_preemptions > 0
    summary = engine.metrics.summary()
    assert summary["preemptions"] == engine.scheduler.num_preemptions
    if mode == "swap":
        assert engine.runner.num_swapped_out > 0 and engine.runner.num_swapped_in > 0
        assert summary["swapped_out_blocks"] == engine.runner.num_swapped_out
    assert_no_leak(engine)


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    reqs = _workload(1)
    expected = _tokens(run_all(make_engine(512, block_size=4), reqs))
    engine = make_engine(24, block_size=4, preemption_mode="swap", num_cpu_blocks=3,
                         max_num_batched_tokens=64, max_num_seqs=16)
    outs = run_all(engine, reqs, check_every_step=True)
    assert _tokens(outs) == expected
    assert_no_leak(engine)


def test_preemption_picks_the_latest_arrival():
    engine = make_engine(16, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    records = _spy(engine)
    ps = prompts([6, 6, 6, 6], seed=2)
    outs = run_all(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=20))
                            for i, p in enumerate(ps)])
    _check_greedy(outs, ps, 20)
    victims = 0
    for before, out in records:
        for v in out.preempted:
            victims += 1
            survivors = [g for g in before if g not in out.preempted]
            assert all(g.key < v.key for g in survivors), "a later arrival kept running"
    assert victims > 0
    assert outs["0"].metrics["num_preemptions"] == 0
    assert_no_leak(engine)


# ---------------------------------------------------------------------------- errors, abort
def test_requests_that_can_never_fit_get_an_error_and_the_others_finish():
    engine = make_engine(8, block_size=4, max_model_len=40, max_num_batched_tokens=64,
                         max_num_seqs=8)
    ps = prompts([6, 45, 5, 33, 7])
    params = [GREEDY, GREEDY, GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=30)]
    outs = run_all(engine, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(ps, params))])
    assert "max_model_len=40" in outs["1"].error                 # longer than the model
    assert "KV-cache blocks" in outs["3"].error                  # longer than the whole pool
    assert "KV-cache blocks" in outs["4"].error                  # grows past the whole pool
    assert len(outs["4"].outputs[0].token_ids) > 0
    for rid in ("1", "3", "4"):
        assert outs[rid].finished and outs[rid].outputs[0].finish_reason == "error"
    for i in (0, 2):
        assert outs[str(i)].error is None
        assert outs[str(i)].outputs[0].token_ids == reference_greedy(ps[i], 8)
    assert engine.metrics.summary()["error_requests"] == 3
    assert_no_leak(engine)


def test_generation_stops_at_max_model_len():
    engine = make_engine(64, max_model_len=20)
    outs = run_all(engine, [("0", prompts([15])[0], SamplingParams(temperature=0, max_tokens=50))])
    c = outs["0"].outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"


def test_bad_requests_raise_at_add_time():
    engine = make_engine(64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        engine.add_request("a", [1, 64], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", "text prompt", GREEDY)
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [1, 2], GREEDY)


def test_abort_frees_blocks():
    engine = make_engine(64, max_num_seqs=2, max_num_batched_tokens=64)
    ps = prompts([30, 20, 10, 12])
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=30))
    for _ in range(3):
        engine.step()
    used = engine.block_manager.num_gpu_blocks - engine.block_manager.num_free_blocks
    assert engine.abort("0") and engine.abort("3")        # running, waiting
    assert not engine.abort("0") and not engine.abort("nope")
    assert engine.block_manager.num_gpu_blocks - engine.block_manager.num_free_blocks < used
    engine.block_manager.check_invariants()
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(outs) == {"1", "2"}
    assert outs["1"].outputs[0].token_ids == reference_greedy(ps[1], 30)
    assert_no_leak(engine)


# --------------------------------------------------------------------------------- stress
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_finish_without_leaks(seed):
    rng = random.Random(seed)
    reqs = _workload(seed, n=12)
    expected = _tokens(run_all(make_engine(1024, block_size=4), reqs))
    kw = dict(block_size=4, max_num_batched_tokens=rng.choice([16, 32, 64]),
              enable_prefix_caching=rng.random() < 0.7,
              preemption_mode=rng.choice(["recompute", "swap"]))
    kw["max_num_seqs"] = min(kw["max_num_batched_tokens"], rng.choice([4, 8, 16]))
    engine = make_engine(rng.choice([20, 28, 40]), num_cpu_blocks=rng.choice([0, 8, 64]), **kw)
    outs = run_all(engine, reqs, check_every_step=True)
    assert set(outs) == {r[0] for r in reqs}
    ok = {rid: toks for rid, toks in _tokens(outs).items() if outs[rid].error is None}
    assert ok == {rid: expected[rid] for rid in ok}
    assert_no_leak(engine)
