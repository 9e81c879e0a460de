"""The transformers integration on CUDA (Triton kernels): accuracy against eager attention in
half precision, greedy decoding, memory profiling and swapping through pinned CPU caches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pagedattn.integrations.hf import ModelRunner, make_step_input  # noqa: E402

from .hf_models import ARCHITECTURES, build_checkpoint, random_prompts  # noqa: E402
from .test_hf_attention import paged_greedy, scattered_tables  # noqa: E402

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_gpu_checkpoints"))
    return lambda name: build_checkpoint(name, root)


def cuda_eager(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).cuda().eval()


def cuda_runner(path, dtype, **kwargs):
    kwargs.setdefault("num_gpu_blocks", NUM_BLOCKS)
    return ModelRunner(path, block_size=BLOCK_SIZE, dtype=dtype, device="cuda", **kwargs)


@torch.no_grad()
def eager_logits(model, prompts):
    return torch.cat([model(torch.tensor([p], device="cuda"), use_cache=False).logits[0].float() for p in prompts])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_half_precision_prefill_as_accurate_as_eager(arch, dtype, checkpoint):
    """Paged logits in half precision are about as far from float32 as eager's own are."""
    path = checkpoint(arch)
    prompts = random_prompts([13, 6, 37], seed=1)
    reference = eager_logits(cuda_eager(path, torch.float32), prompts)
    eager_err = (eager_logits(cuda_eager(path, dtype), prompts) - reference).abs().max().item()
    runner = cuda_runner(path, dtype)
    step = make_step_input(prompts, [0, 0, 0], scattered_tables([13, 6, 37]), BLOCK_SIZE, "cuda")
    step.logits_indices = torch.arange(step.num_tokens, device="cuda")
    paged_err = (runner.execute(step) - reference).abs().max().item()
    assert paged_err <= 2 * eager_err + 1e-2, (paged_err, eager_err)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_decode_matches_generate_fp32(arch, checkpoint):
    from transformers import GenerationConfig

    path = checkpoint(arch)
    eager = cuda_eager(path, torch.float32)
    prompts = random_prompts([5, 11, 17], seed=2)
    got = paged_greedy(cuda_runner(path, torch.float32), prompts, 16, device="cuda")
    config = GenerationConfig(do_sample=False, max_new_tokens=16, min_new_tokens=16,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        want = eager.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert tokens == want[0, len(prompt):].tolist()


def test_profile_num_blocks_fits_the_budget(checkpoint):
    runner = cuda_runner(checkpoint("llama"), torch.bfloat16, num_gpu_blocks=None)
    # Other test workers may hold (and release) GPU memory meanwhile: ask for what is in use now
    # plus 2 GiB, and check the pool against that 2 GiB with a margin for their churn.
    free, total = torch.cuda.mem_get_info()
    n = runner.profile_num_blocks(min(1.0, (total - free + 2 * 2**30) / total), 512, BLOCK_SIZE, max_num_seqs=8)
    pool_bytes = n * runner.kv_cache_bytes_per_block
    assert 2**28 <= pool_bytes <= 3 * 2**30  # a tiny model leaves most of the 2 GiB to the pool
    before = torch.cuda.memory_allocated()
    runner.initialize_cache(n)
    assert torch.cuda.memory_allocated() - before <= pool_bytes + 2**26  # the pool plus small bookkeeping
    prompt = random_prompts([200], seed=6)[0]
    out = runner.execute(make_step_input([prompt], [0], [list(range(50))], BLOCK_SIZE, "cuda"))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def test_swap_through_pinned_cpu_caches(checkpoint):
    runner = cuda_runner(checkpoint("qwen3"), torch.float16, num_cpu_blocks=8)
    assert all(k.is_pinned() and v.is_pinned() for k, v in runner.kv_cache.cpu_caches)
    prompt = random_prompts([10], seed=5)[0]
    table = [7, 3, 12]
    first = runner.execute(make_step_input([prompt], [0], [table], BLOCK_SIZE, "cuda")).argmax(-1).item()
    want = runner.execute(make_step_input([[first]], [10], [table], BLOCK_SIZE, "cuda"))
    runner.swap_out([(7, 0), (3, 1), (12, 2)])
    for k, v in runner.kv_caches:
        k[table] = 0
        v[table] = 0
    runner.swap_in([(0, 30), (1, 31), (2, 32)])
    got = runner.execute(make_step_input([[first]], [10], [[30, 31, 32]], BLOCK_SIZE, "cuda"))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
