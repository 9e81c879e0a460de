"""Multi-step decode: several decode steps from one schedule, each step's inputs the previous one's
samples on the device, the tokens read once for all of them.

The fake runner reads every context back from its paged cache, so an input filled from the wrong
sample, a slot appended for the wrong position or a block hashed before its ids were all known
changes the outputs. Each test runs the same requests with one step a schedule and with several.
"""

from __future__ import annotations

import pytest
from pagedattn.integrations.engine import SamplingParams

from tests.integrations.test_engine_async import _mixed_requests, _tokens
from tests.integrations.test_engine_fakes import (
    assert_no_leak,
    make_engine,
    prompts,
    reference_greedy,
    run_all,
)


def _count_multi(engine):
    """Count schedules that ran several steps and the most steps one ran."""
    seen = {"multi": 0, "most": 1}
    schedule = engine.scheduler.schedule

    def wrapped(*args, **kwargs):
        out = schedule(*args, **kwargs)
        seen["multi"] += out.num_steps > 1
        seen["most"] = max(seen["most"], out.num_steps)
        return out

    engine.scheduler.schedule = wrapped
    return seen


@pytest.mark.parametrize("num_steps", [2, 4, 7])
@pytest.mark.parametrize("case", [
    dict(num_gpu_blocks=512),
    dict(num_gpu_blocks=512, enable_prefix_caching=False),
    dict(num_gpu_blocks=512, block_size=4),                   # a schedule's slots span several blocks
    dict(num_gpu_blocks=40, block_size=4),                    # short of blocks: fewer steps, preemption
    dict(num_gpu_blocks=40, block_size=4, num_cpu_blocks=256, preemption_mode="swap"),
    dict(num_gpu_blocks=512, max_num_batched_tokens=32, max_num_seqs=8),
    dict(num_gpu_blocks=512, eos_token_id=5),
])
def test_multi_step_outputs_equal_single_step_outputs(case, num_steps):
    requests = _mixed_requests()
    results = {}
    for steps in (1, num_steps):
        engine = make_engine(**case, num_scheduler_steps=steps)
        seen = _count_multi(engine)
        results[steps] = _tokens(run_all(engine, requests, check_every_step=True))
        assert_no_leak(engine)
        if steps == 1:
            assert seen["multi"] == 0
        else:
            assert seen["multi"] > 0 and seen["most"] == num_steps, seen
    assert results[num_steps] == results[1]


def test_multi_step_greedy_matches_the_reference_with_eos_and_lengths():
    """Stops inside a schedule (EOS) and lengths that end between its steps (max_tokens, and
    the model's length): the same tokens as the reference, no extra token reported."""
    ps = prompts([3, 9, 17, 30, 5], seed=11)
    engine = make_engine(256, eos_token_id=7, num_scheduler_steps=4, max_model_len=40)
    seen = _count_multi(engine)
    reqs = [(str(i), p, SamplingParams(temperature=0, max_tokens=n))
            for i, (p, n) in enumerate(zip(ps, [40, 13, 6, 40, 1]))]
    outs = run_all(engine, reqs, check_every_step=True)
    for (rid, p, params) in reqs:
        budget = min(params.max_tokens, 40 - len(p))
        assert outs[rid].outputs[0].token_ids == reference_greedy(p, budget, eos=7)
    assert seen["multi"] > 0
    assert_no_leak(engine)


def test_blocks_filled_by_a_multi_step_schedule_are_cached_under_their_real_ids():
    """A prompt that repeats a finished request's prompt + output hits the blocks its output filled,
    as after single steps (blocks of 4 tokens: one schedule of 6 steps fills more than one)."""
    p = prompts([8], seed=5)[0]
    hits = {}
    for steps in (1, 6):
        engine = make_engine(256, block_size=4, num_scheduler_steps=steps)
        first = run_all(engine, [("a", p, SamplingParams(temperature=0, max_tokens=29))])
        follow = p + first["a"].outputs[0].token_ids
        run_all(engine, [("b", follow, SamplingParams(temperature=0, max_tokens=1))])
        hits[steps] = engine.metrics.summary()["prefix_cache_hit_rate"]
        assert_no_leak(engine)
    assert hits[6] == hits[1] > 0


def test_num_scheduler_steps_is_checked():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        make_engine(64, num_scheduler_steps=0)
