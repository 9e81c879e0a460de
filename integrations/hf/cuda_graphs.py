"""CUDA graphs of the decode step: one captured forward per bucketed batch size, replayed each step.

A decode step (one new token per sequence) of an eager transformers model spends most of its time
on the host: hundreds of kernel launches through Python. :class:`DecodeGraphs` captures the
model's whole forward for batch sizes 1, 2, 4, 8, 16, 24, ... up to ``max_num_seqs`` over static
input buffers, and a step of ``S`` sequences replays the smallest graph of at least ``S`` rows
after copying its metadata into the buffers. The padding rows write no cache slot
(``slot_mapping = -1``) and attend one token of block 0 (``seq_lens = 1``), which is always in
range; their logits are dropped.

The captured kernels read the block tables, lengths and slots from the static buffers, so the
graphs stay valid while the allocator hands out blocks; they hold the device caches of the
:class:`~pagedattn.integrations.hf.ModelRunner` they were captured with and must be captured
again when the caches are replaced.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import math
from typing import Callable, Optional

import torch

from .context import PagedForwardContext, forward_context
from .step import StepInput, fill_pending

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_layers(model: torch.nn.Module, num_layers: int) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks: the ``nn.ModuleList`` of ``num_layers`` modules of one class
    (``model.model.layers`` in Llama, ``transformer.h`` in GPT-2, ``model.decoder.layers`` in OPT)."""
    for module in model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
                and len({type(m) for m in module}) == 1):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no ModuleList of {num_layers} identical decoder layers")


def compile_layers(layers: list[torch.nn.Module], backend: str = "inductor") -> None:
    """``torch.compile`` each decoder block in place (regional compilation). Idempotent.

    Run the compiled blocks with the caches bound to the attention modules
    (:func:`~pagedattn.integrations.hf.attention.bound_kv_caches`, context ``kv_caches=None``): the
    caches are then graph inputs and one trace serves every block. Blocks whose constant attributes
    differ (a per-layer sliding window, or caches picked by ``layer_idx`` from the context's list)
    are traced again, so the recompile limits are raised to the number of blocks (the default, 8,
    would stop at the ninth block under ``fullgraph``).

    Args:
        layers: the decoder blocks (:func:`decoder_layers`).
        backend: ``torch.compile``'s backend (the tests pass ``"eager"`` to trace without Inductor).
    """
    import torch._dynamo.config as dynamo_config

    for name, need in (("recompile_limit", 2 * len(layers) + 8), ("cache_size_limit", 2 * len(layers) + 8),
                       ("accumulated_recompile_limit", 4 * len(layers) + 64),
                       ("accumulated_cache_size_limit", 4 * len(layers) + 64)):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), need))
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(backend=backend, fullgraph=True, dynamic=True)


def eager_stance():
    """A context in which compiled modules run eagerly (prefill steps keep the eager path, so
    their varying shapes never recompile the decode graph's blocks)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (rounded up)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    return [b for b in sizes if b < max_num_seqs] + [next(b for b in sizes if b >= max_num_seqs)]


class DecodeGraphs:
    """Captured decode steps of one model over one set of device caches.

    Args:
        forward: ``forward(input_ids [1, B] int64, position_ids [1, B] int64)`` returning the
            logits ``[B, vocab]`` (any float dtype) of every row; called inside the forward
            context that :meth:`capture` sets.
        kv_caches: per layer ``(key_cache, value_cache)``, the caches the graphs read and write;
            None: the caches bound to the model's attention modules while :meth:`capture` runs
            (:func:`~pagedattn.integrations.hf.attention.bound_kv_caches`), which the caller keeps
            alive as long as the graphs.
        block_size: tokens per cache block.
        max_num_seqs: the most sequences of a step (the largest graph).
        max_model_len: the longest sequence; the block-table buffer has
            ``ceil(max_model_len / block_size)`` columns.
        vocab_size: logits per row.
        device: the CUDA device of the model and caches.
        min_batch: the smallest graph (2 for compiled blocks: a batch of 1 would compile them
            again for that size; one sequence then runs padded to two rows).
        num_steps: the most steps launched before the host waits for any (multi-step decode):
            the previous step's samples a step may read (``prev_token_ids``) hold up to
            ``num_steps * max_num_seqs`` rows, and that many steps' host staging buffers rotate.
    """

    def __init__(self, forward: ForwardFn, kv_caches: Optional[list[tuple[torch.Tensor, torch.Tensor]]],
                 block_size: int,
                 max_num_seqs: int, max_model_len: int, vocab_size: int, device: torch.device,
                 min_batch: int = 1, num_steps: int = 1):
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, got {device}")
        if max_model_len < 1 or block_size < 1 or vocab_size < 1:
            raise ValueError(f"max_model_len, block_size and vocab_size must be >= 1, got "
                             f"{max_model_len}, {block_size}, {vocab_size}")
        self.forward = forward
        self.kv_caches = kv_caches
        sizes = graph_batch_sizes(max_num_seqs)
        self.batch_sizes = [b for b in sizes if b >= min_batch] or sizes[-1:]
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.device = torch.device(device)
        n, w, i64, i32 = self.max_batch, self.max_blocks_per_seq, torch.int64, torch.int32
        # Static inputs: ids, positions, slots and pending sources are rows of one buffer (one
        # upload per step). A row whose pending source is >= 0 takes its id from prev_ids (the
        # previous step's sampled ids, copied on the device) inside the graph.
        self._ids_pos_slots = torch.zeros((4, n), dtype=i64, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.pending_src = self._ids_pos_slots.unbind(0)
        self.slot_mapping.fill_(-1)
        self.pending_src.fill_(-1)
        self.prev_ids = torch.zeros(n * max(1, num_steps), dtype=i64, device=device)
        self.block_tables = torch.zeros((n, w), dtype=i32, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=i32, device=device)
        # Pinned host staging of the same, so host-built steps upload without a synchronous copy;
        # a ring of them, so that several steps can be queued before the first has uploaded.
        self._staging = [(torch.zeros((4, n), dtype=i64, pin_memory=True),
                          torch.zeros((n, w), dtype=i32, pin_memory=True),
                          torch.ones(n, dtype=i32, pin_memory=True), torch.cuda.Event())
                         for _ in range(max(2, 2 * num_steps))]
        self._next_staging = 0
        self.logits = torch.empty((n, vocab_size), dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_bytes = 0
        #: steps served by a replay (a figure for the engine's metrics and the tests)
        self.num_replays = 0
        self._worker: Optional[concurrent.futures.ThreadPoolExecutor] = None  # replay_in_background

    def _context(self, batch: int) -> PagedForwardContext:
        return PagedForwardContext(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch], cu_seqlens_q=self.cu_seqlens_q[:batch + 1], max_query_len=1,
            kv_caches=self.kv_caches)

    def _run(self, batch: int) -> None:
        ids = fill_pending(self.input_ids[:batch], self.pending_src[:batch], self.prev_ids)
        with forward_context(self._context(batch)):
            out = self.forward(ids[None], self.positions[None, :batch])
        self.logits[:batch].copy_(out)

    def capture(self) -> None:
        """Capture every batch size, largest first (the smaller graphs reuse its memory pool)."""
        if self.graphs:
            return
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        # No garbage collection while capturing: collecting an older engine's graphs, events or
        # pinned buffers calls CUDA functions that invalidate the capture (seen in the GPU tests).
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.inference_mode():
                for batch in reversed(self.batch_sizes):
                    self._run(batch)  # warm-up: compiles kernels, settles lazy initialisation
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._run(batch)
                    pool = graph.pool() if pool is None else pool
                    self.graphs[batch] = graph
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before

    def bucket(self, step: StepInput) -> Optional[int]:
        """The graph batch size for ``step``, or None when it cannot be replayed (not decode-only,
        more sequences than the largest graph, or a block table wider than the buffer)."""
        num_seqs = step.num_seqs
        if (not self.graphs or step.max_query_len != 1 or step.num_tokens != num_seqs
                or num_seqs > self.max_batch or step.block_tables.shape[1] > self.max_blocks_per_seq
                or (step.prev_token_ids is not None and step.prev_token_ids.shape[0] > self.prev_ids.shape[0])):
            return None
        for b in self.batch_sizes:
            if b >= num_seqs:
                return b
        return None

    def replay(self, step: StepInput, batch: int) -> torch.Tensor:
        """Copy ``step``'s metadata into the buffers, replay the ``batch`` graph and return the
        ``[S, vocab]`` float32 logits (a view of the static output: read it before the next step)."""
        self._stage(step, batch)
        self.graphs[batch].replay()
        self.num_replays += 1
        return self.logits[:step.num_seqs]

    def replay_in_background(self, step: StepInput, batch: int) -> Callable[[], torch.Tensor]:
        """:meth:`replay`, the graph launched from a worker thread on the caller's current stream.

        The metadata uploads are queued here; the launch (about 1-2 ms of host time for a graph of
        ~1,000 kernels, with the GIL released) runs in the worker. Returns a function that waits for
        the launch and returns the logits view. Until it is called, the caller must queue no other
        work on the stream (the graph would run after it).
        """
        self._stage(step, batch)
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedattn-graph")
        stream, graph, s = torch.cuda.current_stream(self.device), self.graphs[batch], step.num_seqs

        def launch() -> None:
            with torch.cuda.stream(stream):
                graph.replay()

        future = self._worker.submit(launch)
        self.num_replays += 1

        def result() -> torch.Tensor:
            future.result()
            return self.logits[:s]

        return result

    def _stage(self, step: StepInput, batch: int) -> None:
        """Copy ``step``'s metadata into the graphs' input buffers (queued on the current stream).

        A step built on the host (CPU tensors) goes through pinned staging buffers: three
        asynchronous uploads. Padding rows ``S..batch`` write no slot and attend one key of block 0.
        Pending tokens (``step.pending_src``) are filled in from ``step.prev_token_ids`` by the graph.
        """
        s, width = step.num_seqs, step.block_tables.shape[1]
        prev = step.prev_token_ids
        if prev is not None:  # (bucket() checked that it fits)
            self.prev_ids[:prev.shape[0]].copy_(prev, non_blocking=True)
        if step.input_ids.device.type == "cpu":
            host, host_tables, host_lens, uploaded = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            uploaded.synchronize()  # the uploads of this buffer's last use have left it
            host[0, :s] = step.input_ids
            host[1, :s] = step.positions
            host[2, :s] = step.slot_mapping
            host[2, s:batch] = -1
            host[3, :batch] = -1  # no pending token, but where the step names them
            if step.pending_src is not None:
                host[3, :s] = step.pending_src
            host_lens[:s] = step.seq_lens
            host_lens[s:batch] = 1
            host_tables[:s, :width] = step.block_tables
            host_tables[s:batch, 0] = 0
            self._ids_pos_slots[:, :batch].copy_(host[:, :batch], non_blocking=True)
            self.seq_lens[:batch].copy_(host_lens[:batch], non_blocking=True)
            self.block_tables[:batch, :width].copy_(host_tables[:batch, :width], non_blocking=True)
            uploaded.record()
        else:
            self.input_ids[:s].copy_(step.input_ids)
            self.positions[:s].copy_(step.positions)
            self.slot_mapping[:s].copy_(step.slot_mapping)
            self.pending_src[:batch].fill_(-1)
            if step.pending_src is not None:
                self.pending_src[:s].copy_(step.pending_src)
            self.block_tables[:s, :width].copy_(step.block_tables)
            self.seq_lens[:s].copy_(step.seq_lens)
            if batch > s:
                self.slot_mapping[s:batch].fill_(-1)
                self.seq_lens[s:batch].fill_(1)
                self.block_tables[s:batch, 0].fill_(0)
