"""The transformers integration against transformers' own eager attention, on real architectures.

Every model is a tiny random-weight checkpoint saved to disk and loaded back through
``from_pretrained`` (``hf_models``); the reference is the same checkpoint loaded with
``attn_implementation="eager"``. Float32 on CPU (the ops' PyTorch reference backend).
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from pagedattn.integrations.hf import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    ModelRunner,
    UnsupportedModelError,
    make_step_input,
)

from .hf_models import ARCHITECTURES, build_checkpoint, load_eager, random_prompts  # noqa: E402

BLOCK_SIZE = 4
NUM_BLOCKS = 64
ATOL = 1e-4


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_checkpoints"))


@pytest.fixture(scope="session")
def checkpoint(checkpoint_root):
    return lambda name: build_checkpoint(name, checkpoint_root)


def make_runner(path, **kwargs) -> ModelRunner:
    kwargs.setdefault("num_gpu_blocks", NUM_BLOCKS)
    return ModelRunner(path, block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu", **kwargs)


def scattered_tables(lengths, seed=0):
    """Block tables covering each length, drawn from a shuffled pool (non-contiguous, interleaved)."""
    pool = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(pool)
    tables = []
    for n in lengths:
        need = -(-n // BLOCK_SIZE)
        tables.append([pool.pop() for _ in range(need)])
    return tables


@torch.no_grad()
def eager_logits(model, tokens):
    return model(torch.tensor([tokens]), use_cache=False).logits[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_logits_match_eager(arch, checkpoint):
    path = checkpoint(arch)
    runner = make_runner(path)
    eager = load_eager(path)
    prompts = random_prompts([13, 6, 21], seed=1)
    step = make_step_input(prompts, [0, 0, 0], scattered_tables([13, 6, 21]), BLOCK_SIZE)
    step.logits_indices = torch.arange(step.num_tokens)  # every position, not only the last ones
    got = runner.execute(step)
    assert got.dtype == torch.float32 and got.shape == (step.num_tokens, eager.config.vocab_size)
    want = torch.cat([eager_logits(eager, p) for p in prompts])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def paged_greedy(runner, prompts, max_new_tokens, seed=0, device="cpu"):
    """Drive the runner by hand: one prefill step for all prompts, then one-token decode steps,
    appending blocks from a shuffled free list as sequences grow."""
    free = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(free)
    tables = [[] for _ in prompts]
    computed = [0] * len(prompts)
    pending = [list(p) for p in prompts]
    out = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        for s, table in enumerate(tables):
            while len(table) * BLOCK_SIZE < computed[s] + len(pending[s]):
                table.append(free.pop())
        step = make_step_input(pending, computed, tables, BLOCK_SIZE, device)
        next_tokens = runner.execute(step).argmax(-1).tolist()
        for s, tok in enumerate(next_tokens):
            computed[s] += len(pending[s])
            pending[s] = [tok]
            out[s].append(tok)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_decode_matches_generate(arch, checkpoint):
    from transformers import GenerationConfig

    path = checkpoint(arch)
    runner = make_runner(path)
    eager = load_eager(path)
    prompts = random_prompts([5, 11, 17], seed=2)
    max_new = 16
    got = paged_greedy(runner, prompts, max_new)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        want = eager.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert tokens == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_matches_single_prefill(arch, checkpoint):
    path = checkpoint(arch)
    runner = make_runner(path)
    prompt, other = random_prompts([19, 7], seed=3)
    whole_table, chunk_table, other_table = scattered_tables([19, 19, 7], seed=3)

    whole = runner.execute(make_step_input([prompt], [0], [whole_table], BLOCK_SIZE))
    # Chunk 1 alone, then chunk 2 in a mixed batch beside another sequence's whole prefill.
    runner.execute(make_step_input([prompt[:9]], [0], [chunk_table], BLOCK_SIZE))
    mixed = runner.execute(make_step_input([prompt[9:], other], [9, 0], [chunk_table, other_table], BLOCK_SIZE))
    torch.testing.assert_close(mixed[0], whole[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], eager_logits(load_eager(path), other)[-1], atol=ATOL, rtol=0)


def test_copy_on_write_fork(checkpoint):
    """A fork shares the full blocks and copies the partial last one; both decode identically."""
    path = checkpoint("llama")
    runner = make_runner(path)
    prompt = random_prompts([10], seed=4)[0]
    table_a = [7, 3, 12]  # 10 tokens: block 12 holds 2
    first = runner.execute(make_step_input([prompt], [0], [table_a], BLOCK_SIZE)).argmax(-1).item()

    runner.copy_blocks([(12, 20)])
    for key_cache, value_cache in runner.kv_caches:
        assert torch.equal(key_cache[20, :2], key_cache[12, :2])
        assert torch.equal(value_cache[20, :2], value_cache[12, :2])
    table_b = [7, 3, 20]
    logits = runner.execute(make_step_input([[first], [first]], [10, 10], [table_a, table_b], BLOCK_SIZE))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    want = eager_logits(load_eager(path), prompt + [first])[-1]
    torch.testing.assert_close(logits[0], want, atol=ATOL, rtol=0)


def test_swap_out_and_in_roundtrip(checkpoint):
    """Swap a sequence's blocks to the CPU pool, clobber them, swap into other blocks, decode on."""
    path = checkpoint("qwen3")
    eager = load_eager(path)
    runner = make_runner(load_eager(path), num_cpu_blocks=8)  # a loaded model, switched in place
    assert runner.model.config._attn_implementation == ATTN_IMPLEMENTATION
    prompt = random_prompts([10], seed=5)[0]
    table = [7, 3, 12]
    first = runner.execute(make_step_input([prompt], [0], [table], BLOCK_SIZE)).argmax(-1).item()
    saved = [(k[table].clone(), v[table].clone()) for k, v in runner.kv_caches]

    runner.swap_out([(7, 0), (3, 1), (12, 2)])
    for k, v in runner.kv_caches:
        k[table] = 1e4
        v[table] = -1e4
    runner.swap_in([(0, 30), (1, 31), (2, 32)])
    new_table = [30, 31, 32]
    for (k, v), (k0, v0) in zip(runner.kv_caches, saved):  # the 10 written token slots came back
        assert torch.equal(k[new_table].flatten(0, 1)[:10], k0.flatten(0, 1)[:10])
        assert torch.equal(v[new_table].flatten(0, 1)[:10], v0.flatten(0, 1)[:10])
    logits = runner.execute(make_step_input([[first]], [10], [new_table], BLOCK_SIZE))
    torch.testing.assert_close(logits[0], eager_logits(eager, prompt + [first])[-1], atol=ATOL, rtol=0)


def test_swap_without_cpu_pool_raises(checkpoint):
    runner = make_runner(checkpoint("gpt2"))
    with pytest.raises(RuntimeError, match="num_cpu_blocks"):
        runner.swap_out([(0, 0)])


def test_runner_cache_geometry_and_cpu_profile(checkpoint):
    runner = make_runner(checkpoint("mistral"))
    # 2 layers x (K + V) x 4 tokens x 1 kv head x 64 x 4 bytes
    assert runner.kv_cache_bytes_per_block == 2 * 2 * 4 * 1 * 64 * 4
    assert len(runner.kv_caches) == 2
    assert tuple(runner.kv_caches[0][0].shape) == (NUM_BLOCKS, BLOCK_SIZE, 1, 64)
    with pytest.raises(RuntimeError, match="num_gpu_blocks"):
        runner.profile_num_blocks(0.9, 256, BLOCK_SIZE)
    lazy = ModelRunner(checkpoint("mistral"), num_gpu_blocks=None, block_size=BLOCK_SIZE, device="cpu")
    with pytest.raises(RuntimeError, match="not allocated"):
        lazy.execute(make_step_input([[1]], [0], [[0]], BLOCK_SIZE))
    lazy.initialize_cache(8)
    assert lazy.execute(make_step_input([[1, 2]], [0], [[0]], BLOCK_SIZE)).shape == (1, 512)
