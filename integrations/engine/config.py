"""Engine configuration: one slotted dataclass, validated on construction.

Every bad value raises ``TypeError`` (wrong type) or ``ValueError`` (bad value) whose message starts
with the field's name, e.g. ``EngineConfig.block_size must be a positive int, got 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["PREEMPTION_MODES", "EngineConfig"]

PREEMPTION_MODES = ("recompute", "swap")


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"EngineConfig.{name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"EngineConfig.{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"EngineConfig.{name} must be a number, got {type(value).__name__}: {value!r}")
    if math.isnan(value) or not (lo < value <= hi if lo_open else lo <= value <= hi):
        left = "(" if lo_open else "["
        raise ValueError(f"EngineConfig.{name} must be in {left}{lo}, {hi}], got {value}")


@dataclass(slots=True)
class EngineConfig:
    """Knobs of the continuous-batching engine.

    Attributes:
        block_size: token slots per KV-cache block.
        num_gpu_blocks: blocks in the device pool; ``None`` = profiled on CUDA from
            ``gpu_memory_utilization`` (required on CPU).
        gpu_memory_utilization: fraction of the GPU memory the model plus the KV cache may use.
        swap_space_gib: CPU memory for swapped-out blocks (``num_cpu_blocks = swap bytes /
            bytes per block``); ``num_cpu_blocks`` overrides it.
        num_cpu_blocks: blocks of the CPU swap pool, or ``None`` to derive from ``swap_space_gib``.
        max_num_seqs: most sequences in one step's batch (1024, as vLLM's ``LLM`` default on
            cards of 70 GB or more; lower it on smaller cards): the products read the weights once
            for more rows, and a batch of queued requests starts at once instead of behind the
            longest; 1,000 ShareGPT-like requests of the 1.1B shape on an H100, same run: 53.2k
            output tokens/s against 50.3k with 512 (and 45.1k with 256 in an earlier run):
            bench/NOTES.md "Engine v13", "Engine v14".
        max_num_batched_tokens: most tokens (prefill + decode) computed in one step (8192: fewer,
            larger prefill steps cost less host time; an H100 spent ~35 ms on each 2,048-token step
            of the 1.1B shape when those ran eagerly, mostly launching kernels).
        max_model_len: longest sequence (prompt + output); ``None`` = the model's
            ``max_position_embeddings`` (no limit if the model does not say).
        enable_chunked_prefill: split prompts longer than the step's token budget across steps.
        enable_prefix_caching: reuse cached KV blocks of a common prompt prefix.
        preemption_mode: ``"recompute"`` (free the blocks, recompute later) or ``"swap"`` (copy
            them to the CPU pool; falls back to recompute when the CPU pool is full).
        watermark: fraction of GPU blocks kept free at admission, for running sequences to grow.
        seed: seed of the sampler's generator (requests without their own seed).
        dtype: model dtype for the runner (``None``: the model's).
        device: runner device (``None``: CUDA if available, else CPU).
        enforce_eager: run every step eagerly; ``False`` (default) replays decode-only steps from
            CUDA graphs captured at start-up for batch sizes up to ``max_num_seqs`` (CUDA only;
            also skipped in the ops' validation mode, whose value checks read the device).
        compile_decode: ``torch.compile`` the model's decoder blocks before capturing those graphs
            (default; regional compilation: fuses the blocks' elementwise work, one trace for every
            block; ~12 s more start-up for the 1.1B shape on an H100 the first time (Inductor caches
            its kernels on disk for the next), decode steps ~35% shorter, 1.44x the output tokens/s
            of a ShareGPT-like run; prompt and mixed steps too, see ``compile_prefill``). Ignored
            when eager.
        fuse_projections: with ``compile_decode`` (default), also replace each block's sibling
            projections (q/k/v, gate/up) by one product each, in place, before compiling (H100, 1.1B
            shape: 8-13% less GPU time a decode step, 1.04-1.11x the output tokens/s; the fused
            weight reuses the old parameters' memory, so the 8B shape peaks at 71.0 GiB reserved
            against 71.6 GiB unfused). ``False`` keeps the model's modules as loaded.
        compile_prefill: with ``compile_decode`` (default), also run prompt and mixed steps through
            the compiled blocks (one more trace, at the warm-up's first prompt step: the token count
            is dynamic). H200, 1.1B shape, 1,000 ShareGPT-like requests: mixed steps 46.5 -> 30.2 ms,
            1.18x the output tokens/s (bench/NOTES.md "Engine v15"). ``False`` runs those steps'
            blocks eagerly.
        async_scheduling: schedule and launch step ``t + 1`` while the device still runs step
            ``t`` (its sampled ids feed step ``t + 1`` on the device; the host reads them after
            launching), so the host's work hides behind the device's. Steps with beam search or
            parallel samples to fork, and steps after which a preemption may be needed, run
            synchronously. A sequence that stops on a sampled token (EOS, stop token or string)
            has computed one more token by then, which is dropped. Needs a runner that fills in
            pending tokens (``ModelRunner`` does); the outputs are the same either way.
        num_scheduler_steps: decode steps run from one schedule (multi-step decode; needs
            ``async_scheduling``): when the batch is all decode rows (nothing waiting to be
            admitted), each step's sampled ids feed the next on the device and the host
            schedules and builds metadata once for all of them. 1: one step a schedule. A
            sequence that stops on a sampled token may compute up to this many extra tokens,
            which are dropped; streamed outputs arrive this many tokens at a time. Default 4
            (H100, 1.1B shape, same run: a 256-sequence decode step 3.24 instead of 3.74 ms,
            GPU busy 0.91 instead of 0.69; ShareGPT-like output tokens/s 1.06x; 8 was no faster
            than 1).
        admit_min_free_seqs: while sequences run and requests wait, admit waiting requests only
            once this many of the ``max_num_seqs`` sequence slots are free (or every waiting
            request fits in the free slots, or ``admit_max_delay_steps`` decode steps passed since
            the last admission), so that under a full queue prompts join in batches rather than
            one mixed prefill step per finished sequence (a mixed step, then run eagerly, took
            ~25 ms on an H100 against ~3 ms a decode step; admitting at every free slot, 1,000
            ShareGPT-like requests spent 13 of 28 s in 528 mixed steps). Below saturation (free
            slots plenty) requests are admitted at once either way. ``None``: ``max_num_seqs // 8``
            (at least 1); 1: admit as soon as a slot frees (vLLM's policy). A schedule whose
            admission waits may run several decode steps (``num_scheduler_steps``).
        admit_max_delay_steps: decode steps after the last admission after which waiting requests
            are admitted even with fewer free slots than ``admit_min_free_seqs`` (bounds the
            wait; ``0`` turns the batching off).
        threaded_graph_launch: with async scheduling, launch a decode step's CUDA graph from a
            worker thread (the launch releases the GIL) while the engine reads the previous
            step's tokens; off by default (an H100 step took 5.26 instead of 4.84 ms with it).
    """

    block_size: int = 16
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float = 4.0
    num_cpu_blocks: int | None = None
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    watermark: float = 0.01
    seed: int = 0
    dtype: Any = None
    device: Any = None
    enforce_eager: bool = False
    compile_decode: bool = True
    fuse_projections: bool = True
    compile_prefill: bool = True
    async_scheduling: bool = True
    threaded_graph_launch: bool = False
    num_scheduler_steps: int = 4
    admit_min_free_seqs: int | None = None
    admit_max_delay_steps: int = 64

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1)
        _check_int("num_gpu_blocks", self.num_gpu_blocks, 1, allow_none=True)
        _check_float("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        if isinstance(self.swap_space_gib, bool) or not isinstance(self.swap_space_gib, (int, float)):
            raise TypeError(f"EngineConfig.swap_space_gib must be a number, got "
                            f"{type(self.swap_space_gib).__name__}: {self.swap_space_gib!r}")
        if not self.swap_space_gib >= 0:
            raise ValueError(f"EngineConfig.swap_space_gib must be >= 0, got {self.swap_space_gib}")
        _check_int("num_cpu_blocks", self.num_cpu_blocks, 0, allow_none=True)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        for name in ("enable_chunked_prefill", "enable_prefix_caching", "enforce_eager",
                     "compile_decode", "fuse_projections", "compile_prefill", "async_scheduling",
                     "threaded_graph_launch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"EngineConfig.preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        _check_float("watermark", self.watermark, 0.0, 1.0)
        if self.watermark >= 1.0:
            raise ValueError(f"EngineConfig.watermark must be < 1, got {self.watermark}")
        _check_int("seed", self.seed, 0)
        _check_int("num_scheduler_steps", self.num_scheduler_steps, 1)
        _check_int("admit_min_free_seqs", self.admit_min_free_seqs, 1, allow_none=True)
        _check_int("admit_max_delay_steps", self.admit_max_delay_steps, 0)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # A step must be able to give every running sequence its decode token.
            raise ValueError(f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_num_seqs ({self.max_num_seqs})")
        if self.admit_min_free_seqs is not None and self.admit_min_free_seqs > self.max_num_seqs:
            raise ValueError(f"EngineConfig.admit_min_free_seqs ({self.admit_min_free_seqs}) "
                             f"must be <= max_num_seqs ({self.max_num_seqs})")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len}) when "
                             f"enable_chunked_prefill is False")

    @property
    def admit_min_free(self) -> int:
        """``admit_min_free_seqs`` with its default applied."""
        if self.admit_min_free_seqs is not None:
            return self.admit_min_free_seqs
        return max(1, self.max_num_seqs // 8)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, config: EngineConfig | None = None, **kwargs: Any) -> EngineConfig:
        """A config from ``config`` (or the defaults) with ``kwargs`` fields replaced."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown EngineConfig field(s): {', '.join(unknown)}")
        base = {f: getattr(config, f) for f in cls.field_names()} if config is not None else {}
        base.update(kwargs)
        return cls(**base)
