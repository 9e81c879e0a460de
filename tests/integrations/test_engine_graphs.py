"""Decode CUDA graphs, the parts that run anywhere: bucket sizes, config, when graphs are skipped.
Replays themselves are tested on the GPU (test_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from pagedattn.integrations.engine import EngineConfig
from pagedattn.integrations.engine.runner import maybe_capture_graphs
from pagedattn.integrations.hf.cuda_graphs import DecodeGraphs, decoder_layers, eager_stance, graph_batch_sizes

from tests.integrations.hf_models import ARCHITECTURES, build_checkpoint, load_eager


@pytest.mark.parametrize("max_num_seqs, sizes", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (4, [1, 2, 4]), (5, [1, 2, 4, 8]), (8, [1, 2, 4, 8]),
    (9, [1, 2, 4, 8, 16]), (20, [1, 2, 4, 8, 16, 24]),
])
def test_graph_batch_sizes_cover_every_batch(max_num_seqs, sizes):
    assert graph_batch_sizes(max_num_seqs) == sizes
    for s in range(1, max_num_seqs + 1):
        assert any(b >= s for b in sizes)


def test_graph_batch_sizes_256():
    sizes = graph_batch_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))


def test_graph_batch_sizes_rejects_zero():
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_enforce_eager_must_be_bool():
    with pytest.raises(TypeError, match="EngineConfig.enforce_eager"):
        EngineConfig(num_gpu_blocks=8, enforce_eager="yes")
    with pytest.raises(TypeError, match="EngineConfig.fuse_projections"):
        EngineConfig(num_gpu_blocks=8, fuse_projections=1)
    assert EngineConfig().fuse_projections is True  # the default (see its docstring)


def test_fuse_projections_and_compile_prefill_reach_the_capture():
    """maybe_capture_graphs passes each flag only when set (runners without them keep working)."""
    seen = []

    class Runner:
        device = torch.device("cuda")

        def capture_decode_graphs(self, max_num_seqs, max_model_len, compile=False, **kwargs):
            seen.append((compile, kwargs))

            class Graphs:
                batch_sizes, max_batch, pool_bytes = [1], 1, 0
            return Graphs()

    for fuse in (False, True):
        maybe_capture_graphs(Runner(), EngineConfig(num_gpu_blocks=8, fuse_projections=fuse, compile_prefill=False,
                                                    num_scheduler_steps=1), 128)
    maybe_capture_graphs(Runner(), EngineConfig(num_gpu_blocks=8, fuse_projections=False, num_scheduler_steps=1), 128)
    assert seen == [(True, {}), (True, {"fuse_projections": True}), (True, {"compile_prefill": True})]
    assert EngineConfig().compile_prefill is True  # the default (see its docstring)


def test_decode_graphs_need_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        DecodeGraphs(lambda i, p: None, [], 16, 4, 64, 10, torch.device("cpu"))


class _Runner:
    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = 0

    def capture_decode_graphs(self, max_num_seqs, max_model_len, compile=False):
        self.calls += 1


@pytest.mark.parametrize("eager", [True, False])
def test_no_graphs_off_cuda_or_when_eager(eager):
    runner = _Runner("cpu")
    assert maybe_capture_graphs(runner, EngineConfig(num_gpu_blocks=8, enforce_eager=eager), 128) is None
    assert runner.calls == 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("graph_layers"))
    return lambda arch: build_checkpoint(arch, root)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_layers_found_for_every_architecture(checkpoints, arch):
    """compile_decode compiles the repeated decoder blocks: they must be found in every tested model."""
    model = load_eager(checkpoints(arch))
    num_layers = model.config.num_hidden_layers
    layers = decoder_layers(model, num_layers)
    assert len(layers) == num_layers and len({type(m) for m in layers}) == 1
    # the blocks are the ones that run attention: each holds a module with the layer's index
    idx = [next(m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
           for layer in layers]
    assert idx == list(range(num_layers))


def test_decoder_layers_missing_is_an_error():
    with pytest.raises(ValueError, match="no ModuleList of 3 identical decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 3)


def test_eager_stance_runs_compiled_modules_eagerly():
    calls = []

    def backend(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    class Block(torch.nn.Module):  # a user module: dynamo skips torch's own as a top-level frame
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.relu(x @ self.weight) + 1

    layer = Block()
    layer.compile(backend=backend, fullgraph=True)
    x = torch.randn(2, 4)
    with eager_stance():
        want = layer(x)
    assert calls == []  # not compiled under the stance
    assert torch.equal(layer(x), want) and len(calls) == 1


def test_step_input_to_same_device_is_itself():
    from pagedattn.integrations.hf.step import make_step_input

    step = make_step_input([[1, 2, 3], [4]], [0, 5], [[0], [1]], 16, "cpu")
    assert step.to("cpu") is step
    assert step.num_tokens == 4 and step.num_seqs == 2


def test_compile_layers_raises_the_recompile_limit_to_the_number_of_blocks():
    """Blocks that differ in constants trace again: 22 blocks must not hit the default limit of 8."""
    import torch._dynamo.config as dynamo_config

    from pagedattn.integrations.hf.cuda_graphs import compile_layers

    layers = [torch.nn.Linear(2, 2) for _ in range(22)]
    compile_layers(layers)
    assert dynamo_config.recompile_limit >= 22
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in layers)


def _compiled_trace_run(path, bound: bool, fuse: bool = False):
    """Compile a 4-block Llama's blocks (backend "eager"), run one decode step of 3 sequences with the
    caches bound to the modules or passed by list; return (traces, logits, eager logits)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from pagedattn.integrations.hf import ModelRunner
    from pagedattn.integrations.hf.attention import bound_kv_caches
    from pagedattn.integrations.hf.context import PagedForwardContext, forward_context
    from pagedattn.integrations.hf.cuda_graphs import compile_layers

    runner = ModelRunner(path, num_gpu_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    caches = runner.kv_caches
    for kc, vc in caches:
        kc.normal_()
        vc.normal_()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (1, 3), generator=gen)
    positions = torch.tensor([[5, 2, 7]])

    def step(kv_caches):
        ctx = PagedForwardContext(slot_mapping=torch.tensor([5, 10, 31]), block_tables=torch.tensor(
            [[0, 1], [2, 0], [6, 7]], dtype=torch.int32), seq_lens=torch.tensor([6, 3, 8], dtype=torch.int32),
            cu_seqlens_q=torch.tensor([0, 1, 2, 3], dtype=torch.int32), max_query_len=1, kv_caches=kv_caches)
        with torch.inference_mode(), forward_context(ctx):
            return runner._graph_forward(ids, positions).clone()

    want = step(caches)  # eager, caches by list (writes the same K/V the compiled run writes again)
    dynamo.reset()
    counters.clear()
    try:
        if fuse:
            from pagedattn.integrations.hf.fused_linear import fuse_sibling_linears
            assert fuse_sibling_linears(runner.model) == 8
        compile_layers(decoder_layers(runner.model, 4), backend="eager")
        if bound:
            with bound_kv_caches(runner.model, caches):
                got = step(None)
        else:
            got = step(caches)
        return counters["stats"]["unique_graphs"], got, want
    finally:
        dynamo.reset()


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    from tests.integrations.hf_models import CONFIGS, save_checkpoint

    config = CONFIGS["llama"]()
    config.num_hidden_layers = 4
    return save_checkpoint(config, str(tmp_path_factory.mktemp("llama4")))


@pytest.mark.parametrize("bound, traces, fuse", [(True, 1, False), (False, 4, False), (True, 1, True)])
def test_caches_bound_to_the_modules_give_one_trace_for_every_block(llama4, bound, traces, fuse):
    """Caches picked by layer_idx from the context's list make Dynamo trace each block again; bound to
    the attention modules, they are graph inputs and one trace serves all four blocks (also with the
    sibling projections fused, as the engine's compiled graphs run them)."""
    num_traces, got, want = _compiled_trace_run(llama4, bound, fuse)
    assert num_traces == traces
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bound_kv_caches_attaches_and_detaches(llama4):
    from pagedattn.integrations.hf import ModelRunner
    from pagedattn.integrations.hf.attention import KEY_CACHE_ATTR, attention_modules, bound_kv_caches
    from pagedattn.integrations.hf.context import PagedForwardContext, forward_context

    runner = ModelRunner(llama4, num_gpu_blocks=4, block_size=4, dtype=torch.float32, device="cpu")
    modules = attention_modules(runner.model)
    assert [m.layer_idx for m in modules] == [0, 1, 2, 3]
    with bound_kv_caches(runner.model, runner.kv_caches):
        assert all(getattr(m, KEY_CACHE_ATTR) is runner.kv_caches[m.layer_idx][0] for m in modules)
    assert not any(hasattr(m, KEY_CACHE_ATTR) for m in modules)
    with pytest.raises(ValueError, match=r"cannot bind 3 layers' caches .*layer_idx \[0, 1, 2, 3\]"):
        with bound_kv_caches(runner.model, runner.kv_caches[:3]):
            pass
    ctx = PagedForwardContext(slot_mapping=torch.tensor([0]), block_tables=torch.zeros((1, 1), dtype=torch.int32),
                              seq_lens=torch.ones(1, dtype=torch.int32),
                              cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, kv_caches=None)
    with torch.inference_mode(), forward_context(ctx), pytest.raises(RuntimeError, match="no caches are bound"):
        runner._graph_forward(torch.zeros((1, 1), dtype=torch.int64), torch.zeros((1, 1), dtype=torch.int64))


def test_compiled_prompt_steps_match_eager_with_one_trace(llama4):
    """compile_prefill: prompt and mixed steps through the compiled blocks (backend "eager" here) give the eager
    logits, and steps of different token counts share one trace (caches bound, no step-dependent integer)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from pagedattn.integrations.hf import ModelRunner
    from pagedattn.integrations.hf.cuda_graphs import compile_layers
    from pagedattn.integrations.hf.step import make_step_input

    runner = ModelRunner(llama4, num_gpu_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    caches = runner.kv_caches
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 512, (2, 6), generator=gen).tolist()
    steps = [make_step_input([prompt[0][:5], prompt[1][:3]], [0, 0], [[0, 1], [2, 3]], 4),
             make_step_input([prompt[0][5:6], prompt[1][3:6]], [5, 3], [[0, 1], [2, 3]], 4)]
    want = [runner._forward(s, caches).clone() for s in steps]
    dynamo.reset()
    counters.clear()
    try:
        compile_layers(decoder_layers(runner.model, 4), backend="eager")
        runner._compiled_layers = runner._compiled_prefill = True
        got = [runner._forward(s, caches).clone() for s in steps]
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        dynamo.reset()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
