"""A fake model runner for fast engine tests, the helpers built on it, and tests of the fake.

:class:`FakeRunner` keeps a real paged "KV cache" (each slot holds the token id and position
written there) and computes each sequence's next-token logits from the tokens it *reads back from
the cache* through its block table: a wrong slot mapping, block table, copy-on-write, swap or
prefix-cache hit changes the outputs (and reading a slot written for another position fails loudly).
:func:`reference_greedy` computes the same model straight from the token history, the ground truth.
"""

from __future__ import annotations

import torch
from pagedattn.integrations.engine import LLMEngine, SamplingParams

P = 2_147_483_629  # a prime < 2**31
R = 1_000_003
MAX_LEN = 4096
_POWS = torch.ones(MAX_LEN, dtype=torch.int64)
for _i in range(1, MAX_LEN):
    _POWS[_i] = _POWS[_i - 1] * R % P


def _mix(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(vocab)
    return (torch.randint(1, P, (vocab,), generator=gen, dtype=torch.int64),
            torch.randint(0, P, (vocab,), generator=gen, dtype=torch.int64))


def history_hash(tokens: torch.Tensor) -> int:
    n = tokens.shape[0]
    return int(((tokens.to(torch.int64) + 1) * _POWS[:n]).sum() % P)


def logits_from_hashes(hashes: torch.Tensor, vocab: int, scale: float = 8.0) -> torch.Tensor:
    a, b = _mix(vocab)
    x = (hashes[:, None] * a[None, :] + b[None, :]) % P
    return x.to(torch.float64).div(P).mul(scale).to(torch.float32)


class FakeRunner:
    """A deterministic toy model with a paged cache; the interface of ``ModelRunner``."""

    def __init__(self, num_gpu_blocks: int, block_size: int = 16, num_cpu_blocks: int = 0,
                 vocab_size: int = 64, max_model_len: int | None = None,
                 eos_token_id: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.model = None
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.kv_cache_bytes_per_block = 1024
        self.cache = torch.full((num_gpu_blocks * block_size, 2), -1, dtype=torch.int64)
        self.cpu_cache = torch.full((num_cpu_blocks * block_size, 2), -1, dtype=torch.int64)
        self.steps: list[tuple[int, int]] = []  # (num_seqs, num_tokens) per step
        self.num_copied = self.num_swapped_out = self.num_swapped_in = self.num_async_calls = 0

    def _block(self, cache: torch.Tensor, b: int) -> torch.Tensor:
        return cache[b * self.block_size:(b + 1) * self.block_size]

    def copy_blocks(self, pairs):
        for s, d in pairs:
            self._block(self.cache, d).copy_(self._block(self.cache, s))
        self.num_copied += len(pairs)

    def swap_out(self, pairs):
        for g, c in pairs:
            self._block(self.cpu_cache, c).copy_(self._block(self.cache, g))
        self.num_swapped_out += len(pairs)

    def swap_in(self, pairs):
        for c, g in pairs:
            self._block(self.cache, g).copy_(self._block(self.cpu_cache, c))
        self.num_swapped_in += len(pairs)

    #: fills in pending tokens (async scheduling), as ModelRunner does
    supports_pending_tokens = True

    def execute_async(self, step):
        """ModelRunner's interface: the step runs at once here; the logits come from the returned function."""
        self.num_async_calls += 1
        logits = self.execute(step)
        return lambda: logits

    def execute(self, step) -> torch.Tensor:
        ids, pos, slots = step.resolved_input_ids(), step.positions, step.slot_mapping
        assert int(ids.min()) >= 0, "a pending token was not filled in"
        tables, lens, cu = step.block_tables, step.seq_lens, step.cu_seqlens_q
        num_tokens, num_seqs = ids.shape[0], lens.shape[0]
        assert ids.dtype == pos.dtype == slots.dtype == torch.int64
        assert tables.dtype == lens.dtype == cu.dtype == torch.int32
        assert cu.shape[0] == num_seqs + 1 and int(cu[-1]) == num_tokens == pos.shape[0]
        assert torch.equal(step.logits_indices, cu[1:].to(torch.int64) - 1)
        q = cu[1:] - cu[:-1]
        assert int(q.min()) >= 1 and step.max_query_len == int(q.max())
        # Positions of each sequence's new tokens are its last ones.
        for i in range(num_seqs):
            s, e = int(cu[i]), int(cu[i + 1])
            expect = torch.arange(int(lens[i]) - (e - s), int(lens[i]))
            assert torch.equal(pos[s:e], expect), f"seq {i}: positions {pos[s:e]} != {expect}"
        ok = slots >= 0
        self.cache[slots[ok], 0] = ids[ok]
        self.cache[slots[ok], 1] = pos[ok]
        hashes = []
        bs = self.block_size
        for i in range(num_seqs):
            n = int(lens[i])
            p = torch.arange(n)
            ctx = self.cache[tables[i, p // bs].to(torch.int64) * bs + p % bs]
            bad = ctx[:, 1] != p
            if bool(bad.any()):
                j = int(bad.nonzero()[0])
                raise AssertionError(f"KV cache corruption: seq {i} reads position {j} from a slot "
                                     f"written for position {int(ctx[j, 1])}")
            hashes.append(history_hash(ctx[:, 0]))
        self.steps.append((num_seqs, num_tokens))
        return logits_from_hashes(torch.tensor(hashes, dtype=torch.int64), self.vocab_size)


def reference_logits(tokens: list[int], vocab: int = 64) -> torch.Tensor:
    return logits_from_hashes(torch.tensor([history_hash(torch.tensor(tokens))]), vocab)[0]


def reference_greedy(prompt: list[int], max_tokens: int, vocab: int = 64,
                     eos: int | None = None) -> list[int]:
    """Greedy output of the fake model computed from the token history (no cache)."""
    toks, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(reference_logits(toks, vocab).argmax())
        out.append(t)
        toks.append(t)
        if t == eos:
            break
    return out


def make_engine(num_gpu_blocks: int = 256, *, block_size: int = 16, num_cpu_blocks: int = 0,
                vocab_size: int = 64, max_model_len: int | None = None,
                eos_token_id: int | None = None, **config) -> LLMEngine:
    runner = FakeRunner(num_gpu_blocks, block_size, num_cpu_blocks, vocab_size, max_model_len,
                        eos_token_id)
    config.setdefault("max_num_seqs", min(256, config.get("max_num_batched_tokens", 2048)))
    return LLMEngine(runner, block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                     num_cpu_blocks=num_cpu_blocks, **config)


def run_all(engine: LLMEngine, requests, check_every_step: bool = False, max_steps: int = 100_000):
    """Add ``[(request_id, prompt_ids, params)]``, step to the end; final outputs by id."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
        steps += 1
        assert steps < max_steps, "engine does not finish"
        if check_every_step:
            engine.block_manager.check_invariants()
    return done


def assert_no_leak(engine: LLMEngine) -> None:
    mgr = engine.block_manager
    mgr.check_invariants()
    assert mgr.num_seqs == 0
    assert mgr.num_free_blocks == mgr.num_gpu_blocks
    assert mgr.num_free_cpu_blocks == mgr.num_cpu_blocks


def prompts(lengths, vocab: int = 64, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


# ------------------------------------------------------------------------------ tests of the fake
def test_fake_engine_matches_reference():
    engine = make_engine(64)
    ps = prompts([5, 17, 33, 1])
    outs = run_all(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)], check_every_step=True)
    for i, p in enumerate(ps):
        assert outs[str(i)].outputs[0].token_ids == reference_greedy(p, 8)
    assert_no_leak(engine)


def test_fake_runner_detects_a_wrong_block_table():
    from pagedattn.integrations.hf.step import make_step_input

    runner = FakeRunner(8, block_size=4)
    runner.execute(make_step_input([[1, 2, 3, 4, 5]], [0], [[0, 1]], 4))
    try:
        runner.execute(make_step_input([[6]], [5], [[1, 0]], 4))
    except AssertionError as e:
        assert "corruption" in str(e)
    else:
        raise AssertionError("a wrong block table went unnoticed")
