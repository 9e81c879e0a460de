"""The engine's host time per decode step, with a null model (CPU).

A 256-sequence decode step of ``LLMEngine`` on a runner that returns fixed logits at once: what is
left is the engine's own Python and numpy work (schedule, metadata, sampling bookkeeping, outputs),
the part of a GPU step that async scheduling must hide behind the device. The synchronous engine, the
async one with one decode step a schedule and the default (async, 4 decode steps a schedule) are timed in
the same process, alternating rounds, medians of per-round means of the time per decode step (one token a
sequence).

Run as a script (writes ``bench/results/cpu/engine_host.json``)::

    python bench/bench_engine_host.py [--rounds 9] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pagedattn.integrations.engine import LLMEngine, SamplingParams  # noqa: E402

NUM_SEQS = 256
VOCAB = 256
BLOCK_SIZE = 16


class NullRunner:
    """The runner interface with no model: fixed logits, nothing written (fills pending tokens)."""

    supports_pending_tokens = True

    def __init__(self, num_blocks: int) -> None:
        self.device = torch.device("cpu")
        self.model = None
        self.block_size = BLOCK_SIZE
        self.num_gpu_blocks = num_blocks
        self.num_cpu_blocks = 0
        self.vocab_size = VOCAB
        self.max_model_len = 4096
        self.eos_token_id = None
        self.kv_cache_bytes_per_block = 1024
        self.logits = torch.randn(2 * NUM_SEQS, VOCAB, generator=torch.Generator().manual_seed(0))

    def copy_blocks(self, pairs) -> None:
        pass

    def swap_out(self, pairs) -> None:
        pass

    def swap_in(self, pairs) -> None:
        pass

    def execute(self, step) -> torch.Tensor:
        step.resolved_input_ids()
        return self.logits[:step.num_seqs]


def make_engine(async_scheduling: bool, num_scheduler_steps: int = 1) -> LLMEngine:
    eng = LLMEngine(NullRunner(20_000), num_gpu_blocks=20_000, block_size=BLOCK_SIZE,
                    async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps)
    eng.stream_outputs = False
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(NUM_SEQS):  # prompts of 100..355 tokens: every offset within a block occurs
        eng.add_request(str(i), [(j * 7 + i) % VOCAB for j in range(100 + i)], params)
    while eng.scheduler.waiting or any(s.num_computed_tokens < len(s.token_ids) - 1
                                       for g in eng.scheduler.running for s in g.seqs):
        eng.step()
    for _ in range(10):
        eng.step()
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "engine_host.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the null model's sampling on the CPU: no intra-op threads spinning beside the engine
    engines = {"async_steps4": make_engine(True, 4), "async": make_engine(True), "sync": make_engine(False)}
    per_round: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for mode, eng in engines.items():
            before = eng.metrics.num_steps
            t = time.perf_counter()
            for _ in range(-(-args.steps // eng.num_scheduler_steps)):
                eng.step()
            per_round[mode].append((time.perf_counter() - t) / (eng.metrics.num_steps - before) * 1e3)
    res = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "load_average": os.getloadavg(), "num_seqs": NUM_SEQS,
           "decode_steps_per_round": args.steps,
           "step_ms": {m: statistics.median(v) for m, v in per_round.items()},
           "rounds_ms": per_round, "command": "python bench/bench_engine_host.py"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["step_ms"]), "->", args.out)


if __name__ == "__main__":
    main()
