"""End to end with the real ModelRunner: a tiny random Llama saved with ``save_pretrained`` and
loaded back; the engine's outputs must equal transformers' ``generate`` token for token."""

from __future__ import annotations

import pytest
import torch
from pagedattn.integrations.engine import LLM, SamplingParams

from tests.integrations.hf_models import build_checkpoint, load_eager, random_prompts

MAX_NEW = 64
BEAM_NEW = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("engine_ckpt")))


@pytest.fixture(scope="module")
def hf_model(llama):
    return load_eager(llama)


@pytest.fixture(scope="module")
def greedy_case(hf_model):
    ps = random_prompts([3, 10, 17, 31, 40, 55], seed=0)
    shared = ps[4][:32]  # two prompts share two full blocks with prompt 4
    ps += [shared + s for s in random_prompts([5, 21], seed=1)]
    refs = []
    with torch.inference_mode():
        for p in ps:
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            refs.append(out[0, len(p):].tolist())
    return ps, refs


def _assert_no_leak(llm):
    mgr = llm.engine.block_manager
    mgr.check_invariants()
    assert mgr.num_seqs == 0 and mgr.num_free_blocks == mgr.num_gpu_blocks
    assert mgr.num_free_cpu_blocks == mgr.num_cpu_blocks


VARIANTS = {
    "prefix_cache": dict(num_gpu_blocks=256),
    "no_prefix_cache": dict(num_gpu_blocks=256, enable_prefix_caching=False),
    "chunked_prefill": dict(num_gpu_blocks=256, max_num_batched_tokens=16, max_num_seqs=8),
    "recompute": dict(num_gpu_blocks=24),
    "swap": dict(num_gpu_blocks=24, preemption_mode="swap", num_cpu_blocks=64),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(llama, greedy_case, variant):
    ps, refs = greedy_case
    llm = LLM(llama, device="cpu", **VARIANTS[variant])
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == ps
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert o.finished and o.error is None
        assert o.outputs[0].token_ids == ref, f"prompt {i} (length {len(ps[i])})"
        assert o.outputs[0].finish_reason == "length"
    s = llm.metrics.summary()
    assert s["output_tokens"] == len(ps) * MAX_NEW
    if variant == "prefix_cache":
        assert s["prefix_cached_tokens"] >= 2 * 32
    if variant in ("recompute", "swap"):
        assert s["preemptions"] > 0
    if variant == "swap":
        assert s["swapped_out_blocks"] > 0 and s["swapped_in_blocks"] > 0
    if variant == "chunked_prefill":
        assert s["max_batch_tokens"] <= 16
    by_batch = s["steps_by_batch"]
    assert sum(b["steps"] for kind in by_batch.values() for b in kind.values()) == s["steps"]
    assert set(by_batch) <= {"decode", "mixed"} and by_batch["mixed"] and by_batch["decode"]
    assert all(b["seconds"] > 0 for kind in by_batch.values() for b in kind.values())
    _assert_no_leak(llm)


@pytest.fixture(scope="module")
def beam_case(hf_model):
    ps = random_prompts([5, 20, 37], seed=3)
    refs = {}
    with torch.inference_mode():
        for eos in (None, "mid"):
            refs[eos] = []
            for i, p in enumerate(ps):
                kw = {}
                if eos == "mid":  # a token of the unconstrained best beam: hypotheses end early
                    tok = refs[None][i][0][2]
                    kw = dict(eos_token_id=tok, pad_token_id=tok)
                out = hf_model.generate(torch.tensor([p]), max_new_tokens=BEAM_NEW, do_sample=False,
                                        num_beams=4, early_stopping=False, length_penalty=1.0, **kw)
                refs[eos].append((out[0, len(p):].tolist(), kw.get("eos_token_id")))
    return ps, refs


@pytest.mark.parametrize("eos", [None, "mid"])
@pytest.mark.parametrize("pool", ["large", "preempting"])
def test_beam_search_matches_hf_generate(llama, beam_case, eos, pool):
    ps, refs = beam_case
    kw = dict(num_gpu_blocks=256) if pool == "large" else dict(num_gpu_blocks=22, block_size=8)
    llm = LLM(llama, device="cpu", **kw)
    params = [SamplingParams(use_beam_search=True, beam_width=4, max_tokens=BEAM_NEW,
                             stop_token_ids=[e] if e is not None else [])
              for _, e in refs[eos]]
    outs = llm.generate(ps, params, use_tqdm=False)
    for i, (o, (ref, e)) in enumerate(zip(outs, refs[eos])):
        assert o.error is None
        assert o.outputs[0].token_ids == ref, f"prompt {i}"
        if e is not None and ref[-1] == e:
            assert o.outputs[0].finish_reason == "stop"
    if eos == "mid":
        assert any(len(r) < BEAM_NEW for r, _ in refs[eos]), "no hypothesis ended early"
    if pool == "preempting":
        assert llm.metrics.summary()["preemptions"] > 0
    _assert_no_leak(llm)


def test_parallel_sampling_under_preemption_matches_an_unconstrained_run(llama):
    ps = random_prompts([12, 30, 7, 45], seed=5)
    params = [SamplingParams(n=3, temperature=1.0, top_k=50, seed=10 + i, max_tokens=20)
              for i in range(len(ps))]
    free = LLM(llama, device="cpu", num_gpu_blocks=128, block_size=8)
    expected = [[c.token_ids for c in o.outputs] for o in free.generate(ps, params, use_tqdm=False)]
    for mode in ("recompute", "swap"):
        llm = LLM(llama, device="cpu", num_gpu_blocks=20, block_size=8, preemption_mode=mode,
                  num_cpu_blocks=64 if mode == "swap" else 0)
        outs = llm.generate(ps, params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in outs] == expected
        assert llm.metrics.summary()["preemptions"] > 0
        _assert_no_leak(llm)
    assert any(len({tuple(t) for t in e}) > 1 for e in expected)


def test_llm_takes_a_loaded_model_and_prints_metrics(llama, greedy_case, capsys):
    from transformers import AutoModelForCausalLM

    ps, refs = greedy_case
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    llm = LLM(model, num_gpu_blocks=128, device="cpu")
    outs = llm.generate(ps[:3], [SamplingParams(temperature=0, max_tokens=n) for n in (4, 9, 1)],
                        use_tqdm=True)
    assert [o.outputs[0].token_ids for o in outs] == [refs[0][:4], refs[1][:9], refs[2][:1]]
    llm.metrics.print_table()
    table = capsys.readouterr().out
    for key in ("output_tokens_per_s", "prefill_tokens_per_s", "kv_utilization_mean",
                "prefix_cache_hit_rate", "preemptions", "swapped_out_blocks"):
        assert key in table
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        LLM(llama, device="cpu")   # no profiling on CPU


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gpt2", "opt"])
def test_greedy_matches_hf_generate_on_every_architecture(arch, tmp_path):
    """8 prompts of mixed lengths x 64 new tokens through the engine (prefix caching on, a pool
    small enough to preempt), token-identical to transformers' own ``generate`` (eager)."""
    from tests.integrations.hf_models import ARCHITECTURES

    assert arch in ARCHITECTURES
    path = build_checkpoint(arch, str(tmp_path))
    hf = load_eager(path)
    ps = random_prompts([3, 9, 16, 17, 25, 33, 40, 52], seed=5)
    with torch.inference_mode():
        refs = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):].tolist()
                for p in ps]
    llm = LLM(path, device="cpu", num_gpu_blocks=40, block_size=8)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert o.error is None and o.outputs[0].token_ids == ref, f"{arch}: prompt {i} (length {len(ps[i])})"
    assert llm.metrics.summary()["preemptions"] > 0
    _assert_no_leak(llm)
