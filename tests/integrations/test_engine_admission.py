"""Batched admission under a full queue (EngineConfig.admit_min_free_seqs / admit_max_delay_steps),
with the fake runner."""

from __future__ import annotations

import pytest
from pagedattn.integrations.engine import SamplingParams

from tests.integrations.test_engine_fakes import assert_no_leak, make_engine, prompts, reference_greedy, run_all
from tests.integrations.test_engine_scheduler import _spy


def _admission_run(max_tokens, **config):
    """16 seats, 48 requests of staggered lengths: (outputs, per-step (running, admitted, decode rows))."""
    engine = make_engine(1024, max_num_seqs=16, max_num_batched_tokens=256, **config)
    records, waiting = _spy(engine), []
    schedule = engine.scheduler.schedule

    def wrapped(*args, **kwargs):
        waiting.append(len(engine.scheduler.waiting))
        return schedule(*args, **kwargs)

    engine.scheduler.schedule = wrapped
    ps = prompts([3 + i % 7 for i in range(48)], seed=5)
    reqs = [(str(i), p, SamplingParams(temperature=0, max_tokens=max_tokens(i))) for i, p in enumerate(ps)]
    outs = run_all(engine, reqs, check_every_step=True)
    for i, p in enumerate(ps):
        assert outs[str(i)].outputs[0].token_ids == reference_greedy(p, max_tokens(i)), f"request {i}"
    assert_no_leak(engine)
    steps = [(sum(g.num_live for g in before), sum(1 for x in out.seqs if x.num_computed == 0 and x.num_new_tokens > 1),
              out.num_decode_tokens, num_waiting) for (before, out), num_waiting in zip(records, waiting)]
    return outs, steps, engine


@pytest.mark.parametrize("num_steps", [1, 4])
def test_admission_waits_for_enough_free_slots_under_a_full_queue(num_steps):
    lengths = lambda i: 5 + (i * 7) % 23  # sequences end one or two at a time
    _, steps, engine = _admission_run(lengths, admit_min_free_seqs=6, admit_max_delay_steps=1000,
                                      num_scheduler_steps=num_steps)
    assert engine.config.admit_min_free == 6
    waves = [(running, admitted) for running, admitted, decode, _ in steps if admitted and decode]
    assert waves, "no admission beside decode rows"
    for running, admitted in waves:
        # admitted beside running decode rows only with >= 6 of 16 slots free, or the queue's tail
        assert 16 - running >= 6 or admitted < 6, (running, admitted)
    _, base, _ = _admission_run(lengths, admit_min_free_seqs=1, num_scheduler_steps=num_steps)
    mixed = lambda st: sum(1 for _, admitted, decode, _ in st if admitted and decode)
    assert mixed(steps) < mixed(base) / 2, (mixed(steps), mixed(base))


def test_admission_delay_bounds_the_wait():
    lengths = lambda i: 5 + (i * 7) % 23
    _, steps, _ = _admission_run(lengths, admit_min_free_seqs=16, admit_max_delay_steps=3)
    decode_since = 0
    for _, admitted, decode, num_waiting in steps:
        if admitted or not num_waiting:
            decode_since = 0
        elif decode:
            decode_since += 1
            # requests wait: admitted within 3 decode steps of the last admission (the step
            # after the third admits, if a slot is free)
            assert decode_since <= 4
    _, off, _ = _admission_run(lengths, admit_min_free_seqs=16, admit_max_delay_steps=0)
    _, eager, _ = _admission_run(lengths, admit_min_free_seqs=1)
    assert [st[1] for st in off] == [st[1] for st in eager]  # delay 0: batching off


def test_admission_is_immediate_below_saturation():
    engine = make_engine(1024, max_num_seqs=16, max_num_batched_tokens=256, admit_min_free_seqs=16,
                         admit_max_delay_steps=1000)
    engine.add_request("a", prompts([6])[0], SamplingParams(temperature=0, max_tokens=40))
    for _ in range(3):
        engine.step()
    engine.add_request("b", prompts([5], seed=1)[0], SamplingParams(temperature=0, max_tokens=4))
    records = _spy(engine)
    engine.step()  # every waiting request fits in the free slots: admitted at once
    assert any(x.seq.seq_id and x.num_new_tokens == 5 for x in records[0][1].seqs)


def test_admission_config_is_checked():
    from pagedattn.integrations.engine import EngineConfig
    assert EngineConfig(max_num_seqs=256).admit_min_free == 32
    assert EngineConfig(max_num_seqs=4).admit_min_free == 1
    with pytest.raises(ValueError, match="admit_min_free_seqs"):
        EngineConfig(max_num_seqs=8, admit_min_free_seqs=9)
    with pytest.raises(ValueError, match="admit_min_free_seqs"):
        EngineConfig(admit_min_free_seqs=0)
    with pytest.raises(ValueError, match="admit_max_delay_steps"):
        EngineConfig(admit_max_delay_steps=-1)
    with pytest.raises(TypeError, match="admit_max_delay_steps"):
        EngineConfig(admit_max_delay_steps=2.5)
