"""CPU benchmarks of the block allocator (``pagedattn.alloc``).

Three headline figures:

* ``alloc_decode_step_ms``: the allocator and metadata work of one decode step for 256 running
  sequences: ``append_slots_batch`` (one token each; lengths are spread so about one in 16
  needs a new block, and about one in 16 fills a block that is then hashed into the prefix
  cache) followed by ``build_metadata`` (padded int32 block tables + int64 slot mapping).
  Goal <= 0.2 ms median.
* ``alloc_prompt_ms``: allocating 256 prompts of 512 tokens (block size 16, prefix caching on)
  into a warm pool: every full block is hashed (BLAKE2b), looked up and registered, and cached
  blocks of earlier rounds are evicted. The prompts are distinct (no prefix hits: the whole
  cost of prefix caching, none of its benefit). The whole cost, hashing included. Goal <= 5 ms
  median.
* ``alloc_prompt_prehashed_ms``: the same rounds allocated with ``block_hashes`` computed
  beforehand by ``hash_prompt_blocks`` (as an engine does when each request arrives): the
  scheduler's ``allocate`` only, hashing excluded. Each round's hashes are computed untimed just
  before it and dropped after it, so evicted keys are freed inside the timed ``allocate`` as
  they are on the plain path. Goal <= 5 ms median.

Each prompt figure is timed alternately, round by round, with its floor (:class:`FloorWorkload`):
the same rounds with only the work any LRU prefix cache keyed by these chained hashes must do in
CPython (hash each full block, delete the evicted key from a ``dict``, insert the new one,
remember it). ``alloc_prompt_floor_ms`` is that floor (against the same 5 ms goal), and
``alloc_prompt_vs_floor`` / ``alloc_prompt_prehashed_vs_floor`` the median over rounds of the
allocator's time over the floor's in the same pair of rounds (adjacent in time, so the VM's drift
between minutes cancels; the ratio of the two medians is recorded too): what the allocator's own
bookkeeping (block objects, free queue, ref counts, block tables, checks) adds.

Also recorded (not headline): ``prompt_hash_prompt_blocks``, the time ``hash_prompt_blocks``
takes for one round of those prompts (the hashing moved to request arrival: the plain path's
cost is about ``alloc_prompt_prehashed_ms`` plus this); the same prompts sharing a 256-token
system prompt, prompts given as Python lists, a decode step without metadata, the hashing alone
of one prompt round (BLAKE2b, used, and SHA-256, BLAKE3 and XXH3-128 where installed, for
comparison, one constructor call per block;
and BLAKE2b computed the way ``allocate`` does it: the floor of ``alloc_prompt_ms``), and the
load average.

Run as a script (writes ``bench/results/cpu/alloc.json`` and the figures into
``bench/results/summary.json``)::

    python bench/bench_alloc.py

or under pytest-benchmark::

    pytest bench/bench_alloc.py --benchmark-only
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedattn.alloc import BlockManager, hash_prompt_blocks  # noqa: E402

BLOCK_SIZE = 16
NUM_SEQS = 256
PROMPT_LEN = 512
VOCAB = 32000


# ----------------------------------------------------------------------------------- decode
class DecodeWorkload:
    """256 running sequences with lengths spread over all offsets within a block.

    The state is rebuilt (untimed, in ``setup``) every ``episode`` steps so the sequences stay
    between 200 and ~800 tokens instead of growing without bound over thousands of rounds.
    """

    def __init__(self, seed: int = 0, num_seqs: int = NUM_SEQS, episode: int = 200):
        self.rng = np.random.default_rng(seed)
        self.num_seqs = num_seqs
        self.episode = episode
        self.tokens = self.rng.integers(0, VOCAB, (episode, num_seqs), dtype=np.int32)
        self._reset()

    def _reset(self):
        lengths = self.rng.integers(200, 600, self.num_seqs)
        num_blocks = int(sum(-(-(n + self.episode) // BLOCK_SIZE) for n in lengths)) + 64
        self.mgr = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        self.seq_ids = list(range(self.num_seqs))
        for seq_id, n in zip(self.seq_ids, lengths):
            self.mgr.allocate(seq_id, self.rng.integers(0, VOCAB, n, dtype=np.int32))
        self.step_idx = 0

    def setup(self):
        if self.step_idx == self.episode:
            self._reset()

    def step(self):
        tokens = self.tokens[self.step_idx]
        self.step_idx += 1
        cow = self.mgr.append_slots_batch(self.seq_ids, tokens)
        meta = self.mgr.build_metadata(self.seq_ids)
        return cow, meta

    def step_without_metadata(self):
        tokens = self.tokens[self.step_idx]
        self.step_idx += 1
        return self.mgr.append_slots_batch(self.seq_ids, tokens)


# ----------------------------------------------------------------------------------- prompts
class PromptWorkload:
    """Rounds of 256 prompts of 512 tokens into a pool that keeps earlier rounds cached.

    With ``prehashed``, ``setup`` also hashes the next round's prompts (``hash_prompt_blocks``,
    untimed) and ``run`` allocates them with these ``block_hashes``, which it then drops.
    """

    def __init__(self, seed: int = 0, shared_prefix: int = 0, as_list: bool = False,
                 num_rounds: int = 64, prehashed: bool = False):
        rng = np.random.default_rng(seed)
        num_blocks = 2 * NUM_SEQS * PROMPT_LEN // BLOCK_SIZE  # room for two rounds
        self.mgr = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        system = rng.integers(0, VOCAB, shared_prefix, dtype=np.int32)
        self.rounds = []
        for _ in range(num_rounds):
            prompts = rng.integers(0, VOCAB, (NUM_SEQS, PROMPT_LEN), dtype=np.int32)
            prompts[:, :shared_prefix] = system
            self.rounds.append([p.tolist() for p in prompts] if as_list else list(prompts))
        self.round_idx = 0
        self.live: list[int] = []
        self.prehashed = prehashed
        self.block_hashes: list | None = None

    def setup(self):
        """Free the previous round (untimed); its blocks stay cached until evicted. With
        ``prehashed``, hash the next round's prompts (untimed: done at request arrival)."""
        for seq_id in self.live:
            self.mgr.free(seq_id)
        self.live = []
        if self.prehashed:
            self.block_hashes = self.hash_round(self.round_idx)

    def hash_round(self, round_idx: int = 0) -> list:
        """``hash_prompt_blocks`` of every prompt of a round."""
        return [hash_prompt_blocks(p, BLOCK_SIZE) for p in self.rounds[round_idx % len(self.rounds)]]

    def run(self):
        prompts = self.rounds[self.round_idx % len(self.rounds)]
        base = self.round_idx * NUM_SEQS
        self.round_idx += 1
        allocate = self.mgr.allocate
        if self.prehashed:
            for i, (prompt, hashes) in enumerate(zip(prompts, self.block_hashes)):
                allocate(base + i, prompt, block_hashes=hashes)
            self.block_hashes = None
        else:
            for i, prompt in enumerate(prompts):
                allocate(base + i, prompt)
        self.live = list(range(base, base + NUM_SEQS))


# ------------------------------------------------------------------------------------- floor
class FloorWorkload:
    """The least work in CPython for the rounds of :class:`PromptWorkload`: the floor of
    ``alloc_prompt_ms``, timed in the same run.

    Per full block, only what any LRU prefix cache keyed by the chained block hashes must do:
    hash ``parent + chunk`` (BLAKE2b, computed as ``allocate`` computes it), delete the key of the
    block it evicts from a ``dict``, insert the new key, and remember which key the block holds.
    No block objects, free queue, ref counts, block tables, sequence state or checks. The pool
    holds two rounds and blocks are reused round-robin, so each round evicts the keys of the
    round before last, as the allocator's LRU free queue does in :class:`PromptWorkload`.
    With ``prehashed``, the keys are made beforehand (untimed, in ``setup``) and the timed round
    only evicts and registers.

    Args:
        rounds: the prompt rounds, those of the :class:`PromptWorkload` it is paired with.
        num_blocks: the pool size, that workload's ``num_gpu_blocks``.
        prehashed: make the keys in ``setup`` and time only the eviction and registration.
    """

    def __init__(self, rounds: list, num_blocks: int, prehashed: bool = False):
        self.rounds = rounds
        self.num_blocks = num_blocks
        self.cached: dict[bytes, int] = {}
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.next_block = 0
        self.round_idx = 0
        self.prehashed = prehashed
        self.keys: list[list[bytes]] | None = None

    def _round(self) -> list:
        return self.rounds[self.round_idx % len(self.rounds)]

    def setup(self):
        """With ``prehashed``, make the next round's keys (untimed)."""
        if self.prehashed:
            self.keys = [hash_prompt_blocks(p, BLOCK_SIZE).block_keys for p in self._round()]

    def run(self) -> list[bytes]:
        """One round; returns the last prompt's block hashes (for the check against
        ``hash_prompt_blocks``; empty when prehashed)."""
        from pagedattn.alloc.hashing import root_hash, split_token_blocks

        prompts = self._round()
        self.round_idx += 1
        cached, block_keys, num_blocks = self.cached, self.block_keys, self.num_blocks
        block = self.next_block
        digests: list[bytes] = []
        # Both loops are written out whole, as allocate's take loops are: a floor must not pay a
        # call or a second pass a block that the allocator does not pay.
        if self.prehashed:
            for keys in self.keys:
                for key in keys:
                    old_key = block_keys[block]
                    if old_key is not None:
                        del cached[old_key]
                    cached[key] = block
                    block_keys[block] = key
                    block += 1
                    if block == num_blocks:
                        block = 0
            self.keys = None
        else:
            empty, root = hashlib.blake2b(), root_hash(b"")
            for prompt in prompts:
                parent = root
                digests = []
                for chunk in split_token_blocks(prompt, BLOCK_SIZE, len(prompt) // BLOCK_SIZE):
                    old_key = block_keys[block]
                    if old_key is not None:
                        del cached[old_key]
                    key = parent + chunk
                    h = empty.copy()
                    h.update(key)
                    parent = h.digest()
                    digests.append(parent)
                    cached[key] = block
                    block_keys[block] = key
                    block += 1
                    if block == num_blocks:
                        block = 0
        self.next_block = block
        return digests


def check_floor_matches(floor: FloorWorkload) -> None:
    """Raise unless the floor hashes what the allocator hashes (same digests as
    ``hash_prompt_blocks`` for the last prompt of a round) and holds two rounds of keys."""
    round_prompts = floor._round()
    digests = floor.run()
    want = hash_prompt_blocks(round_prompts[-1], BLOCK_SIZE).block_hashes
    if list(want) != digests:
        raise AssertionError("the floor's digests differ from hash_prompt_blocks'")
    held = min(floor.round_idx, 2) * NUM_SEQS * (PROMPT_LEN // BLOCK_SIZE)
    if len(floor.cached) != held:
        raise AssertionError(f"the floor holds {len(floor.cached)} keys, expected {held}")


# ----------------------------------------------------------------------------- pytest-benchmark
def test_alloc_decode_step(benchmark):
    work = DecodeWorkload()
    benchmark.pedantic(work.step, setup=work.setup, rounds=2000, warmup_rounds=200, iterations=1)
    work.mgr.check_invariants()


def test_alloc_prompt(benchmark):
    work = PromptWorkload()
    benchmark.pedantic(work.run, setup=work.setup, rounds=60, warmup_rounds=4, iterations=1)
    work.mgr.check_invariants()


def test_alloc_prompt_prehashed(benchmark):
    work = PromptWorkload(prehashed=True, num_rounds=16)
    benchmark.pedantic(work.run, setup=work.setup, rounds=60, warmup_rounds=4, iterations=1)
    work.mgr.check_invariants()


def test_alloc_prompt_floor(benchmark):
    work = PromptWorkload(num_rounds=16)
    floor = FloorWorkload(work.rounds, work.mgr.num_gpu_blocks)
    check_floor_matches(floor)
    benchmark.pedantic(floor.run, setup=floor.setup, rounds=60, warmup_rounds=4, iterations=1)


def test_alloc_prompt_shared_prefix(benchmark):
    work = PromptWorkload(shared_prefix=256)
    benchmark.pedantic(work.run, setup=work.setup, rounds=60, warmup_rounds=4, iterations=1)


# ----------------------------------------------------------------------------------- script
def _time_ms(fn, setup=None, rounds: int = 100, warmup: int = 10) -> list[float]:
    times = []
    for i in range(warmup + rounds):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            times.append((t1 - t0) / 1e6)
    return times


def _time_paired_ms(a, b, rounds: int = 100, warmup: int = 10) -> tuple[list[float], list[float]]:
    """Time workloads ``a`` and ``b`` (each with ``setup`` and ``run``) alternately, one round
    each, the first of the pair swapped every round so neither always runs first."""
    times_a, times_b = [], []
    for i in range(warmup + rounds):
        pair = ((a, times_a), (b, times_b)) if i % 2 == 0 else ((b, times_b), (a, times_a))
        for work, times in pair:
            work.setup()
            t0 = time.perf_counter_ns()
            work.run()
            t1 = time.perf_counter_ns()
            if i >= warmup:
                times.append((t1 - t0) / 1e6)
    return times_a, times_b


def _summary(times: list[float]) -> dict:
    q = np.percentile(times, [10, 50, 90])
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[2],
            "min_ms": min(times), "mean_ms": statistics.fmean(times), "rounds": len(times)}


def _hash_only(work: PromptWorkload, constructor) -> None:
    """The hashing floor of one prompt round: one digest per full block, chained."""
    stride = BLOCK_SIZE * 4
    for prompt in work.rounds[0]:
        data = np.asarray(prompt, dtype="<i4").tobytes()
        parent = bytes(constructor().digest_size)
        for off in range(0, len(data), stride):
            parent = constructor(parent + data[off:off + stride]).digest()


def _hash_only_as_allocated(work: PromptWorkload) -> None:
    """The same digests computed as ``allocate`` does (blocks cut by one ``struct`` call, each
    key hashed with a copy of an empty BLAKE2b state): the floor of ``alloc_prompt_ms``."""
    from pagedattn.alloc.hashing import split_token_blocks

    empty = hashlib.blake2b()
    for prompt in work.rounds[0]:
        parent = bytes(64)
        for chunk in split_token_blocks(prompt, BLOCK_SIZE, len(prompt) // BLOCK_SIZE):
            h = empty.copy()
            h.update(parent + chunk)
            parent = h.digest()


def main() -> dict:
    results: dict = {"load_average_before": os.getloadavg()}
    decode = DecodeWorkload()
    results["decode_step"] = _summary(_time_ms(decode.step, setup=decode.setup, rounds=4000,
                                               warmup=400))
    decode.mgr.check_invariants()
    decode_nometa = DecodeWorkload(seed=1)
    results["decode_step_without_metadata"] = _summary(
        _time_ms(decode_nometa.step_without_metadata, setup=decode_nometa.setup, rounds=4000,
                 warmup=400))
    # The two headline prompt figures, each timed alternately with its floor (same rounds).
    for name, kwargs in [("prompt", {}), ("prompt_prehashed", {"prehashed": True, "num_rounds": 16})]:
        work = PromptWorkload(**kwargs)
        floor = FloorWorkload(work.rounds, work.mgr.num_gpu_blocks, prehashed=work.prehashed)
        if not work.prehashed:
            check_floor_matches(FloorWorkload(work.rounds, work.mgr.num_gpu_blocks))
        times, floor_times = _time_paired_ms(work, floor, rounds=80, warmup=4)
        work.mgr.check_invariants()
        results[name] = _summary(times)
        results[name]["prefix_cache_hit_rate"] = work.mgr.prefix_cache_hit_rate
        results[name]["num_evictions"] = work.mgr.num_evictions
        results[f"{name}_floor"] = _summary(floor_times)
        results[f"{name}_vs_floor"] = results[name]["median_ms"] / results[f"{name}_floor"]["median_ms"]
        results[f"{name}_vs_floor_paired_median"] = statistics.median(
            t / f for t, f in zip(times, floor_times))
    for name, kwargs in [("prompt_shared_prefix_256", {"shared_prefix": 256}),
                         ("prompt_python_lists", {"as_list": True, "num_rounds": 16})]:
        work = PromptWorkload(**kwargs)
        results[name] = _summary(_time_ms(work.run, setup=work.setup, rounds=60, warmup=4))
        work.mgr.check_invariants()
        results[name]["prefix_cache_hit_rate"] = work.mgr.prefix_cache_hit_rate
        results[name]["num_evictions"] = work.mgr.num_evictions
    # The hashing moved to request arrival: hash_prompt_blocks of one round of those prompts.
    work = PromptWorkload(num_rounds=1)
    results["prompt_hash_prompt_blocks"] = _summary(_time_ms(work.hash_round, rounds=60, warmup=4))
    # For reference: hashing alone (no allocation) of one round of the "prompt" workload.
    for name, constructor in [("hash_only_blake2b", hashlib.blake2b),
                              ("hash_only_sha256", hashlib.sha256)]:
        results[name] = _summary(_time_ms(lambda c=constructor: _hash_only(work, c), rounds=40,
                                          warmup=4))
    # Other hashes, where installed (not dependencies): the BLAKE3 package's binding, and xxHash's
    # XXH3-128 for scale only (fast but not collision resistant, so not a candidate).
    for name, module, attr in [("hash_only_blake3", "blake3", "blake3"),
                               ("hash_only_xxh3_128_not_collision_resistant", "xxhash", "xxh3_128")]:
        try:
            constructor = getattr(importlib.import_module(module), attr)
        except ImportError:
            continue
        results[name] = _summary(_time_ms(lambda c=constructor: _hash_only(work, c), rounds=40,
                                          warmup=4))
    results["hash_only_blake2b_as_allocated"] = _summary(
        _time_ms(lambda: _hash_only_as_allocated(work), rounds=40, warmup=4))
    results["load_average_after"] = os.getloadavg()

    from bench.summary import RESULTS_DIR, card_name, update_figures

    decode_ms = results["decode_step"]["median_ms"]
    prompt_ms = results["prompt"]["median_ms"]
    prehashed_ms = results["prompt_prehashed"]["median_ms"]
    card = card_name()
    command = "python bench/bench_alloc.py"
    floor_ms = results["prompt_floor"]["median_ms"]
    update_figures({"alloc_decode_step_ms": (decode_ms, "<= 0.2"),
                    "alloc_prompt_ms": (prompt_ms, "<= 5"),
                    "alloc_prompt_prehashed_ms": (prehashed_ms, "<= 5"),
                    "alloc_prompt_floor_ms": (floor_ms, "<= 5"),
                    "alloc_prompt_vs_floor": (results["prompt_vs_floor_paired_median"], "<= 1.5"),
                    "alloc_prompt_prehashed_vs_floor": (results["prompt_prehashed_vs_floor_paired_median"],
                                                        "<= 1.5")},
                   card=card, command=command)
    out = RESULTS_DIR / "cpu" / "alloc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "card": card, "command": command, "python": platform.python_version(),
        "numpy": np.__version__, "block_size": BLOCK_SIZE, "num_seqs": NUM_SEQS,
        "prompt_len": PROMPT_LEN,
        "figures": {"alloc_decode_step_ms": decode_ms, "alloc_prompt_ms": prompt_ms,
                    "alloc_prompt_prehashed_ms": prehashed_ms, "alloc_prompt_floor_ms": floor_ms,
                    "alloc_prompt_vs_floor": results["prompt_vs_floor_paired_median"],
                    "alloc_prompt_prehashed_floor_ms": results["prompt_prehashed_floor"]["median_ms"],
                    "alloc_prompt_prehashed_vs_floor": results["prompt_prehashed_vs_floor_paired_median"],
                    "prompt_hash_prompt_blocks_ms": results["prompt_hash_prompt_blocks"]["median_ms"]},
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return payload


if __name__ == "__main__":
    payload = main()
    for name, res in payload["results"].items():
        if not isinstance(res, dict):
            print(f"{name:32s} {res}")
            continue
        print(f"{name:32s} median {res['median_ms']:.4f} ms  (p10 {res['p10_ms']:.4f}, "
              f"p90 {res['p90_ms']:.4f}, rounds {res['rounds']})")
