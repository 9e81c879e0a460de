"""Sibling projections fused into one product (pagedattn.integrations.hf.fused_linear), on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.integrations.hf_models import ARCHITECTURES, build_checkpoint, load_eager, random_prompts

# groups fused per layer: q/k/v and gate/up where the architecture has them as plain siblings
EXPECTED_GROUPS = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gpt2": 0, "opt": 1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fused"))
    return {arch: build_checkpoint(arch, root) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_model_gives_the_same_logits(checkpoints, arch):
    from pagedattn.integrations.hf.fused_linear import FusedLinear, fuse_sibling_linears

    model = load_eager(checkpoints[arch]).double()
    fused = copy.deepcopy(model)
    n = fuse_sibling_linears(fused)
    assert n == EXPECTED_GROUPS[arch] * model.config.num_hidden_layers
    assert fuse_sibling_linears(fused) == 0  # idempotent
    assert sum(isinstance(m, FusedLinear) for m in fused.modules()) == n
    # the same parameters, counted once (the parts hold no weights of their own)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([random_prompts([13], seed=2)[0]])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = fused(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(m.pending is None for m in fused.modules() if isinstance(m, FusedLinear))  # nothing held


def test_parts_in_any_order_or_alone_give_their_own_product():
    from pagedattn.integrations.hf.fused_linear import FusedLinearPart, fuse_sibling_linears

    torch.manual_seed(0)
    block = torch.nn.Module()
    block.q_proj, block.k_proj, block.v_proj = (torch.nn.Linear(8, n, bias=True, dtype=torch.float64)
                                                 for n in (8, 4, 4))
    originals = [copy.deepcopy(getattr(block, n)) for n in ("q_proj", "k_proj", "v_proj")]
    old_params = [getattr(block, n).weight for n in ("q_proj", "k_proj", "v_proj")]
    assert fuse_sibling_linears(block) == 1
    # the replaced parameters now hold their rows of the fused weight: no copy of the weights is kept
    fused_ptr = block.qkv_proj.weight.untyped_storage().data_ptr()
    assert all(w.untyped_storage().data_ptr() == fused_ptr for w in old_params)
    torch.testing.assert_close(old_params[1], originals[1].weight, rtol=0, atol=0)
    parts = [block.q_proj, block.k_proj, block.v_proj]
    assert all(isinstance(p, FusedLinearPart) for p in parts)
    x, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    for order in ([2, 1, 0], [0, 1, 2], [1, 0, 2]):
        for i in order:
            torch.testing.assert_close(parts[i](x), originals[i](x), rtol=0, atol=1e-12)
    parts[0](x)  # leaves the other parts' slices of x ...
    torch.testing.assert_close(parts[1](y), originals[1](y), rtol=0, atol=1e-12)  # ... not used for y
    torch.testing.assert_close(parts[2](x), originals[2](x), rtol=0, atol=1e-12)
    assert block.qkv_proj.pending is None
    torch.testing.assert_close(parts[1].weight, originals[1].weight)
    torch.testing.assert_close(parts[2].bias, originals[2].bias)


def test_unfusable_siblings_are_left_alone():
    from pagedattn.integrations.hf.fused_linear import fuse_sibling_linears

    block = torch.nn.Module()
    block.gate_proj = torch.nn.Linear(8, 16, bias=False)
    block.up_proj = torch.nn.Linear(8, 16, bias=True)  # one with a bias, one without
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(4, 16)  # other input sizes
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)  # no v_proj
    for m in (block, mlp, attn):
        assert fuse_sibling_linears(m) == 0
    assert type(block.gate_proj) is torch.nn.Linear and type(attn.q_proj) is torch.nn.Linear


def test_fused_block_compiles_to_one_product_per_group(checkpoints):
    """Under torch.compile(fullgraph=True) a fused Llama block traces 4 products (qkv, o, gate/up,
    down) instead of 7, with the same outputs."""
    import torch._dynamo as dynamo

    from pagedattn.integrations.hf.fused_linear import fuse_sibling_linears

    model = load_eager(checkpoints["llama"])
    fused = copy.deepcopy(model)
    fuse_sibling_linears(fused)
    counts = []

    def backend(gm, example_inputs):
        counts.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)))
        return gm.forward

    ids = torch.tensor([random_prompts([9], seed=4)[0]])
    dynamo.reset()
    try:
        fused.model.layers[0].compile(backend=backend, fullgraph=True, dynamic=True)
        with torch.no_grad():
            got = fused(ids, use_cache=False).logits
            want = model(ids, use_cache=False).logits
    finally:
        dynamo.reset()
    assert counts == [4]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
