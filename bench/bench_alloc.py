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

The workloads are in ``bench/alloc_workloads.py``.

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

from bench.alloc_workloads import (BLOCK_SIZE, NUM_SEQS, PROMPT_LEN, DecodeWorkload,  # noqa: E402
                                   FloorWorkload, PromptWorkload, check_floor_matches)
from pagedattn.alloc.hashing import split_token_blocks  # noqa: E402


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

    headline = {  # NAME -> (value, goal): into summary.json and alloc.json
        "alloc_decode_step_ms": (results["decode_step"]["median_ms"], "<= 0.2"),
        "alloc_prompt_ms": (results["prompt"]["median_ms"], "<= 5"),
        "alloc_prompt_prehashed_ms": (results["prompt_prehashed"]["median_ms"], "<= 5"),
        "alloc_prompt_floor_ms": (results["prompt_floor"]["median_ms"], "<= 5"),
        "alloc_prompt_vs_floor": (results["prompt_vs_floor_paired_median"], "<= 1.5"),
        "alloc_prompt_prehashed_vs_floor": (results["prompt_prehashed_vs_floor_paired_median"], "<= 1.5"),
    }
    card = card_name()
    command = "python bench/bench_alloc.py"
    update_figures(headline, card=card, command=command)
    out = RESULTS_DIR / "cpu" / "alloc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "card": card, "command": command, "python": platform.python_version(),
        "numpy": np.__version__, "block_size": BLOCK_SIZE, "num_seqs": NUM_SEQS,
        "prompt_len": PROMPT_LEN,
        "figures": {**{name: value for name, (value, _) in headline.items()},
                    "alloc_prompt_prehashed_floor_ms": results["prompt_prehashed_floor"]["median_ms"],
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
