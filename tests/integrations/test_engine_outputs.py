"""Engine outputs with the fake runner: stop conditions, stop strings, log-probs, parallel sampling,
beam search."""

from __future__ import annotations

import pytest
from pagedattn.integrations.engine import SamplingParams

from tests.integrations.test_engine_fakes import (
    assert_no_leak,
    make_engine,
    prompts,
    reference_greedy,
    reference_logits,
    run_all,
)


def _check_greedy(outs, ps, max_tokens=8, eos=None):
    for i, p in enumerate(ps):
        o = outs[str(i)]
        assert o.error is None, o.error
        assert o.outputs[0].token_ids == reference_greedy(p, max_tokens, eos=eos), f"request {i}"




# ------------------------------------------------------------------------- stops and logprobs
class CharTokenizer:
    """Token t decodes to chr(ord('a') + t % 26)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)

    def __call__(self, text):
        return {"input_ids": [ord(c) - ord("a") for c in text]}


def test_stop_conditions():
    p = prompts([12], seed=9)[0]
    free = reference_greedy(p, 30)
    eos, stop = free[5], free[9]
    engine = make_engine(64, eos_token_id=eos)
    outs = run_all(engine, [
        ("eos", p, SamplingParams(temperature=0, max_tokens=30)),
        ("ignore", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                     stop_token_ids=[stop])),
        ("len", p, SamplingParams(temperature=0, max_tokens=3)),
    ])
    c = outs["eos"].outputs[0]
    assert c.token_ids == free[:6] and c.finish_reason == "stop" and c.stop_reason is None
    c = outs["ignore"].outputs[0]
    assert c.token_ids == free[:10] and c.finish_reason == "stop" and c.stop_reason == stop
    c = outs["len"].outputs[0]
    assert c.token_ids == free[:3] and c.finish_reason == "length"


def test_stop_strings_cut_the_text():
    p = prompts([12], seed=9)[0]
    free = reference_greedy(p, 30)
    text = CharTokenizer().decode(free)
    target = text[6:8]
    cut = text.find(target)
    from pagedattn.integrations.engine import LLMEngine

    from tests.integrations.test_engine_fakes import FakeRunner

    engine = LLMEngine(FakeRunner(64), tokenizer=CharTokenizer(), num_gpu_blocks=64)
    outs = run_all(engine, [
        ("a", p, SamplingParams(temperature=0, max_tokens=30, stop=[target])),
        ("b", p, SamplingParams(temperature=0, max_tokens=30, stop=[target],
                                include_stop_str_in_output=True)),
    ])
    a, b = outs["a"].outputs[0], outs["b"].outputs[0]
    assert a.text == text[:cut] and a.finish_reason == "stop" and a.stop_reason == target
    assert b.text == text[:cut + 2]
    assert a.token_ids == free[:cut + 2]
    engine.add_request("t", "hello", SamplingParams(temperature=0, max_tokens=2))
    assert run_all(engine, [])["t"].prompt_token_ids == [7, 4, 11, 11, 14]


def test_logprobs_and_cumulative_logprob():
    p = prompts([10], seed=4)[0]
    engine = make_engine(64)
    outs = run_all(engine, [("0", p, SamplingParams(temperature=0, max_tokens=4, logprobs=2))])
    c = outs["0"].outputs[0]
    toks, total = list(p), 0.0
    for t, lp in zip(c.token_ids, c.logprobs):
        ref = reference_logits(toks).log_softmax(-1)
        assert lp[t] == pytest.approx(float(ref[t]), abs=1e-5)
        assert set(ref.topk(2).indices.tolist()) <= set(lp)
        total += float(ref[t])
        toks.append(t)
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


# ------------------------------------------------------------------- parallel sampling, beams
def test_parallel_samples_share_the_prompt_blocks():
    p = prompts([70], seed=1)[0]   # 4 full blocks + a partial one
    engine = make_engine(64)
    engine.add_request("0", p, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8))
    peak = 0
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
        mgr = engine.block_manager
        peak = max(peak, mgr.num_gpu_blocks - mgr.num_free_blocks)
    completions = outs["0"].outputs
    assert len(completions) == 4 and len({tuple(c.token_ids) for c in completions}) > 1
    assert sorted(c.index for c in completions) == [0, 1, 2, 3]
    assert peak < 4 * 5, peak      # 4 independent copies would take 20 blocks
    assert peak <= 4 + 4           # shared full blocks + one last block each
    assert engine.runner.num_copied >= 3   # copy-on-write of the shared partial block
    assert_no_leak(engine)


def test_seeded_parallel_sampling_is_reproducible_and_seed_dependent():
    p = prompts([20], seed=1)[0]
    runs = []
    for seed, extra in ((5, 0), (5, 3), (6, 0)):
        engine = make_engine(64)
        reqs = [("x", p, SamplingParams(n=3, temperature=1.0, seed=seed, max_tokens=8))]
        reqs += [(f"o{i}", q, SamplingParams(temperature=1.0, max_tokens=5))
                 for i, q in enumerate(prompts([9] * extra, seed=8))]
        runs.append([c.token_ids for c in run_all(engine, reqs)["x"].outputs])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_best_of_returns_the_n_most_likely():
    p = prompts([20], seed=1)[0]
    engine = make_engine(64)
    outs = run_all(engine, [("x", p, SamplingParams(n=2, best_of=5, temperature=1.0, seed=1,
                                                    max_tokens=6))])
    cs = outs["x"].outputs
    assert len(cs) == 2 and cs[0].cumulative_logprob >= cs[1].cumulative_logprob
    assert_no_leak(engine)


def test_beam_search_width_one_is_greedy_and_beams_free_their_blocks():
    ps = prompts([9, 30])
    engine = make_engine(64)
    outs = run_all(engine, [(str(i), p, SamplingParams(use_beam_search=True, beam_width=1,
                                                       max_tokens=8)) for i, p in enumerate(ps)],
                   check_every_step=True)
    _check_greedy(outs, ps)
    engine = make_engine(64)
    outs = run_all(engine, [("0", ps[1], SamplingParams(use_beam_search=True, beam_width=4, n=2,
                                                        max_tokens=12))], check_every_step=True)
    cs = outs["0"].outputs
    assert len(cs) == 2 and all(len(c.token_ids) == 12 for c in cs)
    assert cs[0].cumulative_logprob >= cs[1].cumulative_logprob
    assert_no_leak(engine)


def test_beam_search_with_a_stop_token():
    p = prompts([9], seed=2)[0]
    free = make_engine(64)
    best = run_all(free, [("0", p, SamplingParams(use_beam_search=True, beam_width=3,
                                                  max_tokens=12))])["0"].outputs[0].token_ids
    stop = best[4]
    engine = make_engine(64)
    c = run_all(engine, [("0", p, SamplingParams(use_beam_search=True, beam_width=3,
                                                 max_tokens=12, stop_token_ids=[stop]))]
                )["0"].outputs[0]
    if c.token_ids[-1] == stop:
        assert c.finish_reason == "stop"
    else:
        assert c.finish_reason == "length" and stop not in c.token_ids
    assert_no_leak(engine)
