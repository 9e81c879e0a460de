"""Async scheduling: step t + 1 is scheduled and launched before step t's tokens are read.

The fake runner reads every context back from its paged cache, so a pending token filled in
wrongly, a slot appended for the wrong sequence or a block hashed before its last id was known
changes the outputs. Each test runs the same requests with async scheduling on and off.
"""

from __future__ import annotations

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


def _tokens(outs):
    return {rid: [c.token_ids for c in o.outputs] for rid, o in outs.items()}


def _watch(engine):
    """Count steps scheduled while another was in flight, and steps that had pending inputs."""
    seen = {"overlapped": 0, "pending_inputs": 0}
    schedule, execute = engine.scheduler.schedule, engine.runner.execute

    def wrapped_schedule(allow_preemption=True, **kwargs):
        seen["overlapped"] += not allow_preemption  # (the engine's sign of a step in flight)
        return schedule(allow_preemption, **kwargs)

    def wrapped_execute(step):
        seen["pending_inputs"] += step.pending_src is not None
        return execute(step)

    engine.scheduler.schedule = wrapped_schedule
    engine.runner.execute = wrapped_execute
    return seen


def _mixed_requests(n=24, seed=3):
    ps = prompts([5 + (7 * i) % 41 for i in range(n)], seed=seed)
    params = []
    for i in range(n):
        if i % 4 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=6 + i % 9))
        elif i % 4 == 1:
            params.append(SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=12, logprobs=2))
        elif i % 4 == 2:
            params.append(SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[i % 64, (3 * i) % 64]))
        else:
            params.append(SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=10, n=2, best_of=3))
    return [(str(i), p, q) for i, (p, q) in enumerate(zip(ps, params))]


@pytest.mark.parametrize("case", [
    dict(num_gpu_blocks=512),
    dict(num_gpu_blocks=512, enable_prefix_caching=False),
    dict(num_gpu_blocks=40, block_size=4),                                     # recompute preemption
    dict(num_gpu_blocks=40, block_size=4, num_cpu_blocks=256, preemption_mode="swap"),
    dict(num_gpu_blocks=512, max_num_batched_tokens=32, max_num_seqs=8),        # chunked prefill
    dict(num_gpu_blocks=512, eos_token_id=5),
])
def test_async_outputs_equal_sync_outputs(case):
    requests = _mixed_requests()
    results = {}
    for flag in (False, True):
        engine = make_engine(**case, async_scheduling=flag)
        seen = _watch(engine)
        results[flag] = _tokens(run_all(engine, requests, check_every_step=True))
        assert_no_leak(engine)
        if flag:
            assert seen["overlapped"] > 0 and seen["pending_inputs"] > 0, seen
        else:
            assert seen["overlapped"] == seen["pending_inputs"] == 0, seen
    assert results[True] == results[False]


def test_async_greedy_matches_the_reference_with_eos():
    ps = prompts([3, 9, 17, 30], seed=11)
    engine = make_engine(128, eos_token_id=7, async_scheduling=True)
    seen = _watch(engine)
    params = SamplingParams(temperature=0, max_tokens=40)
    outs = run_all(engine, [(str(i), p, params) for i, p in enumerate(ps)], check_every_step=True)
    for i, p in enumerate(ps):
        assert outs[str(i)].outputs[0].token_ids == reference_greedy(p, 40, eos=7)
    assert seen["overlapped"] > 0
    assert_no_leak(engine)


def test_async_beam_search_steps_run_synchronously():
    ps = prompts([6, 11], seed=2)
    beam = SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=6)
    results = {}
    for flag in (False, True):
        engine = make_engine(256, async_scheduling=flag)
        results[flag] = _tokens(run_all(engine, [("b0", ps[0], beam), ("g1", ps[1], GREEDY)],
                                        check_every_step=True))
        assert_no_leak(engine)
    assert results[True] == results[False]


def test_blocks_filled_by_pending_tokens_are_cached_under_their_real_ids():
    """A prompt that repeats a finished request's prompt + output hits the blocks its output filled."""
    p = prompts([8], seed=5)[0]
    hits = {}
    for flag in (False, True):
        engine = make_engine(256, block_size=4, async_scheduling=flag)
        first = run_all(engine, [("a", p, SamplingParams(temperature=0, max_tokens=20))])
        follow = p + first["a"].outputs[0].token_ids
        run_all(engine, [("b", follow, GREEDY)])
        hits[flag] = engine.metrics.summary()["prefix_cache_hit_rate"]
        assert_no_leak(engine)
    assert hits[True] == hits[False] > 0


@pytest.mark.parametrize("num_steps", [1, 5])
def test_abort_while_a_step_is_in_flight(num_steps):
    """One launched step, or a multi-step schedule of 5, in flight when a request is aborted."""
    ps = prompts([10, 12], seed=8)
    engine = make_engine(128, async_scheduling=True, num_scheduler_steps=num_steps)
    params = SamplingParams(temperature=0, max_tokens=30)
    engine.add_request("keep", ps[0], params)
    engine.add_request("drop", ps[1], params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None and len(engine._inflight.steps) == num_steps
    assert engine.abort("drop")
    done = run_all(engine, [])
    assert set(done) == {"keep"}
    assert done["keep"].outputs[0].token_ids == reference_greedy(ps[0], 30)
    assert_no_leak(engine)


def test_threaded_launch_path_gives_the_same_outputs():
    """The engine's threaded-launch order (read the previous step while the forward is launched) on the fake
    runner's execute_async (the worker thread itself needs CUDA graphs: tests/integrations/test_engine_gpu.py)."""
    requests = _mixed_requests(n=16, seed=4)
    results = {}
    for threaded in (False, True):
        engine = make_engine(num_gpu_blocks=64, block_size=4, eos_token_id=9, threaded_graph_launch=threaded)
        results[threaded] = _tokens(run_all(engine, requests, check_every_step=True))
        assert (engine.runner.num_async_calls > 0) == threaded
        assert_no_leak(engine)
    assert results[True] == results[False]


def test_abort_and_reuse_of_the_request_id_while_its_step_is_in_flight():
    ps = prompts([10, 14], seed=12)
    engine = make_engine(128, async_scheduling=True)
    engine.add_request("x", ps[0], SamplingParams(temperature=0, max_tokens=30))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    assert engine.abort("x")
    engine.add_request("x", ps[1], SamplingParams(temperature=0, max_tokens=6))
    done = run_all(engine, [])
    assert done["x"].outputs[0].token_ids == reference_greedy(ps[1], 6)
    assert_no_leak(engine)


def test_a_request_that_never_fits_gets_its_error_while_a_step_is_in_flight():
    """The scheduling call made while a step is in flight may finish a request with an error and
    still schedule nothing; the engine then reads the step and schedules again: the error is kept."""
    ps = prompts([6], seed=13)
    engine = make_engine(8, block_size=4, async_scheduling=True)
    engine.add_request("ok", ps[0], SamplingParams(temperature=0, max_tokens=1))
    engine.step()  # the prompt; its only token in flight, so "ok" is not scheduled again
    assert engine._inflight is not None
    engine.add_request("huge", list(range(40)), SamplingParams(temperature=0, max_tokens=2))
    done = run_all(engine, [])
    assert set(done) == {"ok", "huge"}
    assert done["huge"].error is not None and "KV-cache blocks" in done["huge"].error
    assert done["ok"].outputs[0].token_ids == reference_greedy(ps[0], 1)
    assert_no_leak(engine)
