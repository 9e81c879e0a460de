"""Run a transformers causal LM over paged KV caches, one packed step at a time.

:func:`load_model` loads (or converts) a model to ``attn_implementation="pagedattn"`` and checks
that it can be served; :class:`ModelRunner` owns the model and its caches and runs steps: one
forward over every scheduled sequence's new tokens packed in a single row, returning the logits
of each sequence's last new token.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
from typing import Callable, Optional, Sequence, Union

import torch

from .attention import ATTN_IMPLEMENTATION, bound_kv_caches, register
from .context import PagedForwardContext, forward_context
from .cuda_graphs import DecodeGraphs, compile_layers, decoder_layers, eager_stance
from .fused_linear import fuse_sibling_linears
from .kv_cache import PagedKVCache, kv_cache_bytes_per_block
from .models import architecture_name, check_config_supported, check_model_supported
from .step import StepInput, make_step_input

ModelOrPath = Union[str, os.PathLike, torch.nn.Module]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(path_or_model: ModelOrPath, dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """Load a causal LM with ``attn_implementation="pagedattn"``, in eval mode on ``device``.

    Args:
        path_or_model: a checkpoint directory or hub id (loaded with
            ``AutoModelForCausalLM.from_pretrained``), or an instantiated ``PreTrainedModel``
            (switched in place with ``set_attn_implementation``).
        dtype: the weights' (and caches') dtype; None keeps the checkpoint's / model's own.
        device: where to put the model; None: the given model's device, else CUDA when present.

    Raises:
        UnsupportedModelError: the architecture cannot be served (raised from the config alone,
            before loading weights, where possible).
    """
    register()
    if isinstance(path_or_model, torch.nn.Module):
        model = path_or_model
        check_model_supported(model, probe=False)
        if device is None:
            device = next(model.parameters()).device
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path_or_model)
        check_config_supported(config, architecture_name(config))
        model = AutoModelForCausalLM.from_pretrained(
            path_or_model, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype if dtype is not None else "auto")
    model.to(device=torch.device(device) if device is not None else _default_device())
    if dtype is not None and model.dtype != dtype:
        model.to(dtype=dtype)
    model.eval()
    check_model_supported(model)
    return model


class ModelRunner:
    """A causal LM and its paged KV caches; runs one packed step at a time.

    Args:
        model_or_path: see :func:`load_model`.
        num_gpu_blocks: blocks of the device cache pool; None defers allocation to
            :meth:`initialize_cache` (e.g. after :meth:`profile_num_blocks`).
        block_size: tokens per block (a power of two, 1..256).
        num_cpu_blocks: blocks of the CPU swap pool (0: no swapping).
        dtype: model and cache dtype (None: the checkpoint's).
        device: the model's device (None: see :func:`load_model`). "Device" caches live there,
            CPU included.
    """

    #: ``execute`` fills in a step's pending tokens (``StepInput.pending_src``) on the device
    supports_pending_tokens = True

    def __init__(self, model_or_path: ModelOrPath, num_gpu_blocks: Optional[int] = None, block_size: int = 16,
                 num_cpu_blocks: int = 0, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None):
        self.model = load_model(model_or_path, dtype=dtype, device=device)
        self.spec = check_model_supported(self.model, probe=False)
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.dtype
        self.block_size = block_size
        self.kv_cache: Optional[PagedKVCache] = None
        self.decode_graphs: Optional[DecodeGraphs] = None
        self._compiled_layers = False
        #: run prompt and mixed steps through the compiled blocks too (capture_decode_graphs(compile_prefill=...))
        self._compiled_prefill = False
        #: groups of sibling projections replaced by one product (see capture_decode_graphs)
        self.num_fused_projections = 0
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if num_gpu_blocks is not None:
            self.initialize_cache(num_gpu_blocks, num_cpu_blocks)
        elif num_cpu_blocks:
            raise ValueError("num_cpu_blocks needs num_gpu_blocks (or call initialize_cache later)")

    # -- caches -------------------------------------------------------------------------------

    def initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int = 0) -> None:
        """Allocate (or replace) the device and CPU cache pools (dropping graphs captured on the old ones)."""
        self.decode_graphs = None
        self.kv_cache = None  # free the old pools first
        self.kv_cache = PagedKVCache(self.spec, num_gpu_blocks, self.block_size, self.dtype, self.device,
                                     num_cpu_blocks=num_cpu_blocks)

    @property
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one block (all layers, keys and values) at this runner's block size and dtype."""
        return kv_cache_bytes_per_block(self.spec, self.block_size, self.dtype)

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key_cache, value_cache)`` on the device, ``[num_blocks, block_size, kv_heads, head_dim]``."""
        return self._cache().device_caches

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: copy device blocks ``(src, dst)`` in every layer, in one launch."""
        self._cache().copy_blocks(pairs)

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy ``(device_block, cpu_block)`` pairs to the CPU pool, all layers (async on the stream)."""
        self._cache().swap_out(pairs)

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy ``(cpu_block, device_block)`` pairs back to the device pool, all layers (async)."""
        self._cache().swap_in(pairs)

    def _cache(self) -> PagedKVCache:
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated: pass num_gpu_blocks or call initialize_cache()")
        return self.kv_cache

    # -- steps --------------------------------------------------------------------------------

    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step: write the new tokens' K/V into the caches and return next-token logits.

        A decode-only step replays a captured CUDA graph when :meth:`capture_decode_graphs` ran
        (the returned logits are then a view of the graph's output: read them before the next step).

        Returns:
            [S, vocab_size] float32 logits of the tokens at ``step.logits_indices``.
        """
        graphs = self.decode_graphs
        if graphs is not None:
            batch = graphs.bucket(step)
            if batch is not None:
                return graphs.replay(step, batch)
        return self._forward(step.to(self.device), self._cache().device_caches)

    def execute_async(self, step: StepInput) -> Callable[[], torch.Tensor]:
        """Start :meth:`execute`; returns a function that waits for the launch and returns the logits.

        A decode step with captured graphs launches its graph from a worker thread (the launch
        releases the GIL, so the caller's Python work overlaps it); the caller must queue no other
        device work until it has called the returned function. Other steps run at once.
        """
        graphs = self.decode_graphs
        if graphs is not None:
            batch = graphs.bucket(step)
            if batch is not None:
                return graphs.replay_in_background(step, batch)
        logits = self.execute(step)
        return lambda: logits

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int, compile: bool = False,
                              num_steps: int = 1, fuse_projections: bool = False,
                              compile_prefill: bool = False) -> DecodeGraphs:
        """Capture the decode step in CUDA graphs for batches of up to ``max_num_seqs`` sequences of
        up to ``max_model_len`` tokens (CUDA only; the caches must be allocated).

        Args:
            compile: ``torch.compile`` the model's decoder blocks (regional compilation,
                ``fullgraph=True, dynamic=True``: elementwise work fused, one trace shared by the
                blocks and every batch size but 1) before capturing; other steps keep running
                them eagerly.
            fuse_projections: with ``compile``, first replace each block's sibling projections
                (``q_proj / k_proj / v_proj``, ``gate_proj / up_proj``) by one product each, in
                place, for every step
                (:func:`~pagedattn.integrations.hf.fused_linear.fuse_sibling_linears`).
            num_steps: the most decode steps queued from one schedule (see :class:`DecodeGraphs`).
            compile_prefill: with ``compile``, also run the steps the graphs do not serve (prompt and
                mixed prefill + decode steps) through the compiled blocks (one more trace: the token count
                is dynamic, the step's ``max_query_len`` hint dropped); else those run the blocks eagerly.
        """
        caches = self._cache().device_caches
        head = self.model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else self.model.config.vocab_size
        if compile:
            if fuse_projections:
                # sibling projections (q/k/v, gate/up) as one product each: fewer, fuller kernels
                self.num_fused_projections += fuse_sibling_linears(self.model)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # the replaced weights' blocks back to the driver
            compile_layers(decoder_layers(self.model, self.spec.num_layers))
            self._compiled_layers = True
            self._compiled_prefill = compile_prefill
        # the caches are bound to the attention modules while capturing (one compiled trace serves
        # every block); the graphs keep their addresses, the runner keeps them alive
        graphs = DecodeGraphs(self._graph_forward, None, self.block_size, max_num_seqs, max_model_len, vocab,
                              self.device, min_batch=2 if compile else 1, num_steps=num_steps)
        with bound_kv_caches(self.model, caches):
            graphs.capture()
        self.decode_graphs = graphs
        return graphs

    def _graph_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]

    def _forward(self, step: StepInput, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        compiled = self._compiled_prefill
        # compiled blocks read their caches from the modules (one trace for every block) and no step-dependent
        # integer (the max_query_len hint 0, "unknown": the launcher sizes tiles by the step's token count,
        # which can only change speed)
        ctx = PagedForwardContext(
            slot_mapping=step.slot_mapping, block_tables=step.block_tables, seq_lens=step.seq_lens,
            cu_seqlens_q=step.cu_seqlens_q, max_query_len=0 if compiled else step.max_query_len,
            kv_caches=None if compiled else kv_caches)
        kwargs = dict(input_ids=step.resolved_input_ids()[None], position_ids=step.positions[None], use_cache=False)
        stance = (bound_kv_caches(self.model, kv_caches) if compiled else
                  eager_stance() if self._compiled_layers else contextlib.nullcontext())
        with torch.inference_mode(), forward_context(ctx), stance:
            if self._keeps_logits:
                # The model applies its head (and any final logit scaling / soft-cap) to these rows only.
                logits = self.model(**kwargs, logits_to_keep=step.logits_indices).logits[0]
            else:
                logits = self.model(**kwargs).logits[0, step.logits_indices]
        return logits.float()

    # -- memory profiling ---------------------------------------------------------------------

    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int,
                           block_size: Optional[int] = None, max_num_seqs: Optional[int] = None) -> int:
        """How many cache blocks fit in ``gpu_memory_utilization`` of the GPU's memory (CUDA only).

        Runs a dummy forward of ``max_num_batched_tokens`` tokens (split into sequences no longer
        than the model's ``max_position_embeddings``, or into ``max_num_seqs`` sequences when given,
        so that many logits rows are measured too) on a scratch cache, measures the peak memory
        allocated by torch apart from KV caches, adds memory used outside torch's allocator (CUDA
        context, other processes), and divides what is left of ``gpu_memory_utilization * total``
        by the bytes of one block. Caches this runner already holds count as free for the new pool.

        Raises:
            RuntimeError: not on CUDA (pass ``num_gpu_blocks`` explicitly), or no block fits.
        """
        if self.device.type != "cuda":
            raise RuntimeError(f"profile_num_blocks measures CUDA memory, but the model is on {self.device}; "
                               "pass num_gpu_blocks to ModelRunner (or call initialize_cache) instead")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        block_size = block_size or self.block_size
        lens = _dummy_lengths(max_num_batched_tokens, getattr(self.model.config, "max_position_embeddings", None),
                              max_num_seqs)
        tables, first = [], 0
        for n in lens:
            tables.append(list(range(first, first + math.ceil(n / block_size))))
            first += len(tables[-1])
        step = make_step_input([[0] * n for n in lens], [0] * len(lens), tables, block_size, self.device)

        device = self.device
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = total - free - torch.cuda.memory_reserved(device)
        scratch = PagedKVCache(self.spec, first, block_size, self.dtype, device)
        self._forward(step, scratch.device_caches)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        held_kv = scratch.num_blocks * scratch.bytes_per_block
        if self.kv_cache is not None:
            held_kv += self.kv_cache.num_blocks * self.kv_cache.bytes_per_block
        del scratch
        gc.collect()
        torch.cuda.empty_cache()

        per_block = kv_cache_bytes_per_block(self.spec, block_size, self.dtype)
        budget = gpu_memory_utilization * total - outside_torch - (peak - held_kv)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise RuntimeError(
                f"no KV-cache block fits: {gpu_memory_utilization:.2f} x {total / 2**30:.2f} GiB, minus "
                f"{outside_torch / 2**30:.2f} GiB outside torch and a {(peak - held_kv) / 2**30:.2f} GiB peak of "
                f"weights and activations at {max_num_batched_tokens} tokens, leaves less than one "
                f"{per_block}-byte block; raise gpu_memory_utilization or lower max_num_batched_tokens")
        return num_blocks


def _dummy_lengths(num_tokens: int, max_len: Optional[int], max_num_seqs: Optional[int]) -> list[int]:
    """Split ``num_tokens`` into sequence lengths: ``max_num_seqs`` near-equal ones when given,
    else as few as fit ``max_len``."""
    if max_num_seqs:
        count = min(max_num_seqs, num_tokens)
    else:
        count = math.ceil(num_tokens / max_len) if max_len else 1
    base, extra = divmod(num_tokens, count)
    lens = [base + (i < extra) for i in range(count)]
    if max_len and max(lens) > max_len:
        raise ValueError(f"{num_tokens} tokens in {count} sequences exceed max_position_embeddings {max_len}")
    return lens
