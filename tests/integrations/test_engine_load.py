"""Load test: 256 short requests on the real runner (tiny Llama) with a KV pool so small that
requests are preempted over and over; every request must finish with the tokens of an
unconstrained run, and no block may leak."""

from __future__ import annotations

import random

import pytest
from pagedattn.integrations.engine import LLM, SamplingParams

from tests.integrations.hf_models import build_checkpoint, random_prompts

NUM_REQUESTS = 256


@pytest.fixture(scope="module")
def load_case(tmp_path_factory):
    path = build_checkpoint("llama", str(tmp_path_factory.mktemp("engine_load")))
    rng = random.Random(0)
    ps = random_prompts([rng.randint(4, 24) for _ in range(NUM_REQUESTS)], seed=7)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 16)) if i % 2 == 0 else
              SamplingParams(temperature=1.0, top_p=0.95, seed=i, max_tokens=rng.randint(8, 16))
              for i in range(NUM_REQUESTS)]
    free = LLM(path, device="cpu", num_gpu_blocks=4096, block_size=4)
    expected = [o.outputs[0].token_ids for o in free.generate(ps, params, use_tqdm=False)]
    assert free.metrics.summary()["preemptions"] == 0
    return path, ps, params, expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_many_requests_with_heavy_preemption(load_case, mode):
    path, ps, params, expected = load_case
    llm = LLM(path, device="cpu", num_gpu_blocks=16, block_size=4, preemption_mode=mode,
              num_cpu_blocks=256 if mode == "swap" else 0)
    outs = llm.generate(ps, params, use_tqdm=False)
    assert len(outs) == NUM_REQUESTS
    assert all(o.finished and o.error is None for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == expected
    s = llm.metrics.summary()
    assert s["preemptions"] >= 100, s
    assert s["finished_requests"] == NUM_REQUESTS
    if mode == "swap":
        assert s["swapped_out_blocks"] > 0
    mgr = llm.engine.block_manager
    mgr.check_invariants()
    assert mgr.num_seqs == 0
    assert mgr.num_free_blocks == mgr.num_gpu_blocks
    assert mgr.num_free_cpu_blocks == mgr.num_cpu_blocks
    assert not llm.engine.has_unfinished_requests()
