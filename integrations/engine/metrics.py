"""Figures kept during a run: throughput, KV-cache use, prefix-cache hits, preemptions, swaps."""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedattn.integrations.engine.engine import LLMEngine
    from pagedattn.integrations.engine.scheduler import SchedulerOutput
    from pagedattn.integrations.engine.sequence import SequenceGroup

__all__ = ["EngineMetrics"]

#: lower edges of the batch-size buckets of :meth:`EngineMetrics.steps_by_batch`
_BUCKET_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256)


def _bucket(num_seqs: int) -> int:
    """The lower edge of ``num_seqs``' bucket (``num_seqs >= 1``)."""
    return _BUCKET_EDGES[bisect.bisect_right(_BUCKET_EDGES, num_seqs) - 1]


class EngineMetrics:
    """Running totals of an engine; :meth:`summary` reads them, :meth:`table` formats them."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.reset()

    def reset(self) -> None:
        self.start_time: float | None = None
        self.last_time: float | None = None
        self.num_steps = 0
        self.num_empty_steps = 0
        self.step_time = 0.0
        self.num_prefill_tokens = 0       # prompt (and recomputed) tokens computed
        self.num_decode_tokens = 0        # decode tokens computed
        self.num_generated_tokens = 0     # tokens sampled
        self.num_cached_tokens = 0        # prompt tokens served by the prefix cache
        self.num_finished = 0
        self.num_errors = 0
        self.max_batch_seqs = 0
        self.max_batch_tokens = 0
        self._kv_util_sum = 0.0
        self._usage_sum = 0.0
        self.max_usage = 0.0
        s = self._engine.scheduler
        self._base_preemptions = s.num_preemptions
        self._base_swapped_out = s.num_swapped_out_blocks
        self._base_swapped_in = s.num_swapped_in_blocks
        self._ttft: list[float] = []
        self._latency: list[float] = []
        # per kind of step ("decode" / "mixed") and batch-size bucket: [steps, seconds]
        self._by_batch: dict[tuple[str, int], list[float]] = {}

    def record_step(self, out: SchedulerOutput, num_generated: int, seconds: float) -> None:
        now = time.perf_counter()
        if self.start_time is None:
            self.start_time = now - seconds
        self.last_time = now
        if out.is_empty:
            self.num_empty_steps += 1
            return
        mgr = self._engine.block_manager
        self.num_steps += 1
        self.step_time += seconds
        self.num_prefill_tokens += out.num_prefill_tokens
        self.num_decode_tokens += out.num_decode_tokens
        self.num_generated_tokens += num_generated
        self.num_cached_tokens += out.num_cached_tokens
        self.max_batch_seqs = max(self.max_batch_seqs, len(out.seqs))
        self.max_batch_tokens = max(self.max_batch_tokens, out.num_batched_tokens)
        key = ("mixed" if out.num_prefill_tokens else "decode", _bucket(len(out.seqs)))
        acc = self._by_batch.get(key)
        if acc is None:
            self._by_batch[key] = [1, seconds]
        else:
            acc[0] += 1
            acc[1] += seconds
        self._kv_util_sum += mgr.kv_utilization()
        usage = mgr.usage
        self._usage_sum += usage
        self.max_usage = max(self.max_usage, usage)

    def record_finished(self, g: SequenceGroup) -> None:
        self.num_finished += 1
        self.num_errors += g.error is not None
        if g.first_token_time is not None:
            self._ttft.append(g.first_token_time - g.arrival_time)
        if g.finished_time is not None:
            self._latency.append(g.finished_time - g.arrival_time)

    def summary(self) -> dict[str, Any]:
        s, mgr = self._engine.scheduler, self._engine.block_manager
        elapsed = (self.last_time - self.start_time) if self.start_time is not None else 0.0
        steps = max(self.num_steps, 1)
        rate = (lambda n: n / elapsed if elapsed > 0 else 0.0)
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)
        return {
            "elapsed_s": elapsed,
            "steps": self.num_steps,
            "finished_requests": self.num_finished,
            "error_requests": self.num_errors,
            "output_tokens": self.num_generated_tokens,
            "output_tokens_per_s": rate(self.num_generated_tokens),
            "prefill_tokens": self.num_prefill_tokens,
            "prefill_tokens_per_s": rate(self.num_prefill_tokens),
            "decode_tokens": self.num_decode_tokens,
            "max_batch_seqs": self.max_batch_seqs,
            "max_batch_tokens": self.max_batch_tokens,
            "kv_utilization_mean": self._kv_util_sum / steps,
            "kv_utilization_now": mgr.kv_utilization(),
            "block_usage_mean": self._usage_sum / steps,
            "block_usage_max": self.max_usage,
            "prefix_cache_hit_rate": mgr.prefix_cache_hit_rate,
            "prefix_cached_tokens": self.num_cached_tokens,
            "preemptions": s.num_preemptions - self._base_preemptions,
            "swapped_out_blocks": s.num_swapped_out_blocks - self._base_swapped_out,
            "swapped_in_blocks": s.num_swapped_in_blocks - self._base_swapped_in,
            "mean_ttft_s": mean(self._ttft),
            "mean_latency_s": mean(self._latency),
            "steps_by_batch": self.steps_by_batch(),
        }

    def steps_by_batch(self) -> dict[str, dict[str, dict[str, float]]]:
        """Where the run's time went: per kind of step (``decode``: decode rows only; ``mixed``: with
        prompt tokens) and batch-size bucket (``"16-31"`` sequences), its steps, their total seconds
        and mean milliseconds (a step's time is from its launch, or the previous step's completion
        if later, to its completion)."""
        res: dict[str, dict[str, dict[str, float]]] = {}
        for (kind, lo), (n, sec) in sorted(self._by_batch.items()):
            hi = _BUCKET_EDGES[_BUCKET_EDGES.index(lo) + 1] - 1 if lo != _BUCKET_EDGES[-1] else None
            name = f"{lo}-{hi}" if hi is not None else f"{lo}+"
            res.setdefault(kind, {})[name] = {"steps": int(n), "seconds": sec, "ms_mean": sec / n * 1e3}
        return res

    def table(self) -> str:
        rows = []
        for k, v in self.summary().items():
            if isinstance(v, dict):
                continue  # (steps_by_batch: in summary() only)
            if v is None:
                text = "-"
            elif isinstance(v, float):
                text = f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
            else:
                text = f"{v:,}"
            rows.append((k, text))
        width = max(len(k) for k, _ in rows)
        vwidth = max(len(t) for _, t in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
        body = [f"| {k:<{width}} | {t:>{vwidth}} |" for k, t in rows]
        return "\n".join([line, f"| {'metric':<{width}} | {'value':>{vwidth}} |", line, *body, line])

    def print_table(self) -> None:
        print(self.table())
