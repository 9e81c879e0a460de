"""Glue between the engine and a model runner (``pagedattn.integrations.hf.ModelRunner`` or any
object with the same methods): building it, sizing its pools, reading the model's limits."""

from __future__ import annotations

import logging
from typing import Any

from pagedattn.integrations.engine.config import EngineConfig
from pagedattn.integrations.hf.step import StepInput

__all__ = ["StepInput", "is_runner", "make_runner", "maybe_capture_graphs", "model_limits"]

log = logging.getLogger("pagedattn.engine")


def is_runner(obj: Any) -> bool:
    """Whether ``obj`` is already a runner (has ``execute`` and the cache-copy methods)."""
    return all(callable(getattr(obj, m, None)) for m in ("execute", "copy_blocks", "swap_out", "swap_in"))


def _num_cpu_blocks(runner: Any, cfg: EngineConfig) -> int:
    if cfg.num_cpu_blocks is not None:
        return cfg.num_cpu_blocks
    if cfg.preemption_mode != "swap":
        return 0  # only swapping uses the CPU pool
    return int(cfg.swap_space_gib * 2**30 // runner.kv_cache_bytes_per_block)


def make_runner(model: Any, cfg: EngineConfig) -> tuple[Any, int, int]:
    """The runner for ``model`` and the sizes of its GPU and CPU block pools.

    A ready runner is used as is: its pools must be at least as large as the config asks (its
    ``num_gpu_blocks`` / ``num_cpu_blocks`` attributes, or its ``kv_cache``'s, are the defaults).
    Anything else goes to ``ModelRunner`` (a loaded model, a path or a hub id); its device pool is
    profiled on CUDA when ``num_gpu_blocks`` is None.
    """
    if is_runner(model):
        runner = model
        cache = getattr(runner, "kv_cache", None)
        have_gpu = getattr(runner, "num_gpu_blocks", None) or getattr(cache, "num_blocks", None)
        have_cpu = getattr(runner, "num_cpu_blocks", None)
        if have_cpu is None:
            have_cpu = getattr(cache, "num_cpu_blocks", 0)
        num_gpu = cfg.num_gpu_blocks or have_gpu
        if num_gpu is None:
            raise ValueError("EngineConfig.num_gpu_blocks is required: the runner has no cache pool")
        if have_gpu is not None and num_gpu > have_gpu:
            raise ValueError(f"EngineConfig.num_gpu_blocks ({num_gpu}) exceeds the runner's "
                             f"{have_gpu} cache blocks")
        num_cpu = cfg.num_cpu_blocks if cfg.num_cpu_blocks is not None else have_cpu
        if num_cpu > have_cpu:
            raise ValueError(f"EngineConfig.num_cpu_blocks ({num_cpu}) exceeds the runner's "
                             f"{have_cpu} CPU cache blocks")
        return runner, num_gpu, num_cpu
    from pagedattn.integrations.hf.runner import ModelRunner

    runner = ModelRunner(model, num_gpu_blocks=None, block_size=cfg.block_size, dtype=cfg.dtype,
                         device=cfg.device)
    num_gpu = cfg.num_gpu_blocks
    if num_gpu is None:
        if runner.device.type != "cuda":
            raise ValueError(f"EngineConfig.num_gpu_blocks is required on {runner.device} (the "
                             f"pool is only profiled on CUDA)")
        num_gpu = runner.profile_num_blocks(cfg.gpu_memory_utilization, cfg.max_num_batched_tokens,
                                            cfg.block_size, max_num_seqs=cfg.max_num_seqs)
    num_cpu = _num_cpu_blocks(runner, cfg)
    runner.initialize_cache(num_gpu, num_cpu)
    return runner, num_gpu, num_cpu


def maybe_capture_graphs(runner: Any, cfg: EngineConfig, max_model_len: int | None) -> Any:
    """Capture the runner's decode CUDA graphs unless ``cfg.enforce_eager``; the graphs, or None
    where they do not apply (not CUDA, no ``capture_decode_graphs``, the ops' validation mode, or
    no known ``max_model_len`` to size the block-table buffer), said once in a log line."""
    if cfg.enforce_eager or not callable(getattr(runner, "capture_decode_graphs", None)):
        return None
    from pagedattn.ops import validation_enabled

    device = getattr(runner, "device", None)
    reason = ("not on CUDA" if getattr(device, "type", None) != "cuda" else
              "the ops' validation mode reads device values" if validation_enabled() else
              "max_model_len is unknown" if max_model_len is None else None)
    if reason is not None:
        if getattr(device, "type", None) == "cuda":
            log.info("decode CUDA graphs off: %s", reason)
        return None
    kwargs = {"num_steps": cfg.num_scheduler_steps} if cfg.num_scheduler_steps > 1 else {}
    if cfg.fuse_projections:
        kwargs["fuse_projections"] = True
    if cfg.compile_prefill:
        kwargs["compile_prefill"] = True
    graphs = runner.capture_decode_graphs(cfg.max_num_seqs, max_model_len, compile=cfg.compile_decode, **kwargs)
    log.info("decode CUDA graphs captured for %d batch sizes up to %d (%.1f MiB pool)",
             len(graphs.batch_sizes), graphs.max_batch, graphs.pool_bytes / 2**20)
    return graphs


def model_limits(runner: Any, tokenizer: Any = None) -> tuple[int | None, int | None, list[int]]:
    """``(max_model_len, vocab_size, eos_token_ids)`` from the runner's model (or attributes of
    the same names on the runner) and the tokenizer."""
    model = getattr(runner, "model", None)
    config = getattr(model, "config", None)
    max_len = getattr(runner, "max_model_len", None)
    vocab = getattr(runner, "vocab_size", None)
    if config is not None:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if max_len is None and isinstance(getattr(config, name, None), int):
                max_len = getattr(config, name)
        if vocab is None:
            vocab = getattr(config, "vocab_size", None)
    # The model's own generation config first, as transformers' generate() does; the tokenizer's
    # EOS only when the model names none.
    eos: Any = getattr(runner, "eos_token_id", None)
    if eos is None and model is not None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = []
    elif isinstance(eos, int):
        eos = [eos]
    return max_len, vocab, [int(e) for e in eos]
