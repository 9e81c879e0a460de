"""The engine on CUDA (skipped elsewhere): a profiled pool, the Triton kernels, pinned swapping."""

from __future__ import annotations

import pytest
import torch
from pagedattn.integrations.engine import LLM, SamplingParams

from tests.integrations.hf_models import ARCHITECTURES, build_checkpoint, load_eager, random_prompts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = build_checkpoint("llama", str(tmp_path_factory.mktemp("engine_gpu")))
    hf = load_eager(path).to("cuda")
    ps = random_prompts([3, 10, 17, 31, 40, 55, 64, 90], seed=0)
    refs = []
    with torch.inference_mode():
        for p in ps:
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=48, do_sample=False)
            refs.append(out[0, len(p):].tolist())
    return path, ps, refs


def _no_leak(llm):
    mgr = llm.engine.block_manager
    mgr.check_invariants()
    assert mgr.num_free_blocks == mgr.num_gpu_blocks and mgr.num_seqs == 0


def test_profiled_pool_and_greedy_match_hf(case):
    path, ps, refs = case
    # Other test workers may hold GPU memory: ask for what is in use now plus 1 GiB.
    free, total = torch.cuda.mem_get_info()
    llm = LLM(path, gpu_memory_utilization=min(1.0, (total - free + 2**30) / total), max_num_batched_tokens=1024)
    assert llm.engine.runner.device.type == "cuda"
    assert llm.engine.block_manager.num_gpu_blocks > 1000
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, refs))
    assert same == len(ps), [(o.outputs[0].token_ids, r) for o, r in zip(outs, refs)
                             if o.outputs[0].token_ids != r]
    _no_leak(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_on_cuda_matches_hf(case, mode):
    path, ps, refs = case
    llm = LLM(path, num_gpu_blocks=24, preemption_mode=mode, swap_space_gib=0.01)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    s = llm.metrics.summary()
    assert s["preemptions"] > 0
    if mode == "swap":
        assert llm.engine.block_manager.num_cpu_blocks > 0 and s["swapped_out_blocks"] > 0
    _no_leak(llm)


def test_parallel_and_beam_on_cuda(case):
    path, ps, _ = case
    llm = LLM(path, num_gpu_blocks=512)
    params = [SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=16) for i in range(4)]
    params += [SamplingParams(use_beam_search=True, beam_width=4, max_tokens=16)] * 4
    a = llm.generate(ps, params, use_tqdm=False)
    b = llm.generate(ps, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs]
                                                             for o in b]
    _no_leak(llm)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decode_cuda_graphs_match_eager_and_hf(tmp_path, arch):
    """Every decode step replays a captured graph (batches padded to a bucket), with the same
    greedy tokens as the eager engine and as transformers' generate."""
    path = build_checkpoint(arch, str(tmp_path))
    hf = load_eager(path).to("cuda")
    ps = random_prompts([5, 9, 16, 23, 33, 47, 64], seed=1)  # 7 sequences: padded to the 8-row graph
    with torch.inference_mode():
        refs = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=40, do_sample=False)[0, len(p):].tolist()
                for p in ps]
    del hf
    params = SamplingParams(temperature=0, max_tokens=40)
    # uncompiled blocks here (compile_decode, the default, is test_compiled_decode_graphs_match_hf's)
    graphed = LLM(path, num_gpu_blocks=256, max_num_seqs=16, max_num_batched_tokens=256, compile_decode=False)
    eager = LLM(path, num_gpu_blocks=256, max_num_seqs=16, max_num_batched_tokens=256, enforce_eager=True)
    assert eager.engine.decode_graphs is None
    graphs = graphed.engine.decode_graphs
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 16]
    got = [o.outputs[0].token_ids for o in graphed.generate(ps, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in eager.generate(ps, params, use_tqdm=False)]
    assert graphs.num_replays >= 39  # every step after the prompts' is a decode step
    assert got == want
    assert got == refs
    _no_leak(graphed)


@pytest.mark.parametrize("compile_prefill", [False, True], ids=["eager-prompt-steps", "compiled-prompt-steps"])
def test_compiled_decode_graphs_match_hf(case, compile_prefill):
    """torch.compile of the forward inside the graphs (and, with compile_prefill, of the prompt and mixed steps
    too): the same greedy tokens."""
    path, ps, refs = case
    llm = LLM(path, num_gpu_blocks=256, max_num_seqs=8, max_num_batched_tokens=512, compile_decode=True,
              compile_prefill=compile_prefill)
    graphs = llm.engine.decode_graphs
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert graphs is not None and graphs.num_replays >= 47
    assert [o.outputs[0].token_ids for o in outs] == refs
    _no_leak(llm)


def test_async_scheduling_on_cuda_matches_sync(case):
    """Async scheduling (pending inputs filled inside the decode graphs), also with the graphs launched from a
    worker thread, gives the synchronous engine's outputs: greedy, seeded sampling and a stop token that ends
    requests early, with prefix sharing."""
    path, ps, refs = case
    prompts = ps + [ps[3] + ps[1], ps[3] + ps[2]]  # shared prefixes
    params = [SamplingParams(temperature=0, max_tokens=40) if i % 3 == 0 else
              SamplingParams(temperature=0.9, top_k=50, seed=i, max_tokens=40) if i % 3 == 1 else
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[refs[0][5]])
              for i in range(len(prompts))]
    results = {}
    for mode in ("sync", "async", "threaded", "multistep"):
        llm = LLM(path, num_gpu_blocks=512, async_scheduling=mode != "sync",
                  threaded_graph_launch=mode == "threaded", num_scheduler_steps=4 if mode == "multistep" else 1)
        assert llm.engine.decode_graphs is not None
        schedule, multi = llm.engine.scheduler.schedule, []

        def counted(*args, schedule=schedule, multi=multi, **kwargs):
            out = schedule(*args, **kwargs)
            multi.append(out.num_steps)
            return out

        llm.engine.scheduler.schedule = counted
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[mode] = [o.outputs[0].token_ids for o in outs]
        assert llm.engine.decode_graphs.num_replays > 0
        assert (llm.engine.decode_graphs._worker is not None) == (mode == "threaded")
        assert (max(multi) == 4) == (mode == "multistep")  # several graph replays from one schedule
        _no_leak(llm)
    assert results["async"] == results["sync"] == results["threaded"] == results["multistep"]
    assert results["sync"][0] == refs[0][:40]
