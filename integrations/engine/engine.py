"""The continuous-batching engine: requests in, one scheduled mixed batch per step, outputs out."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import torch
from pagedattn.integrations.engine.beam import beam_step
from pagedattn.integrations.engine.config import EngineConfig
from pagedattn.integrations.engine.launched import LaunchedChain, LaunchedStep, build_step_input
from pagedattn.integrations.engine.metrics import EngineMetrics
from pagedattn.integrations.engine.multistep import MultiStepMixin
from pagedattn.integrations.engine.outputs import OutputBuilder
from pagedattn.integrations.engine.runner import make_runner, maybe_capture_graphs, model_limits
from pagedattn.integrations.engine.sampling import Sampler, SamplingParams
from pagedattn.integrations.engine.scheduler import Scheduler, SchedulerOutput
from pagedattn.integrations.engine.sequence import (
    RequestOutput,
    Sequence,
    SequenceGroup,
    SequenceStatus,
)

from pagedattn.alloc import BlockManager, hash_prompt_blocks

__all__ = ["LLMEngine"]


class LLMEngine(MultiStepMixin):
    """Continuous batching over a paged KV cache (the vLLM paper's engine).

    Args:
        model: a model runner (anything with ``execute``), or what ``ModelRunner`` takes: a
            loaded transformers model, a local path or a hub id.
        config: the :class:`EngineConfig`; keyword arguments override its fields.
        tokenizer: for stop strings and output text (optional; token ids work without it).
        eos_token_id: overrides the EOS id(s) read from the tokenizer / model config.
    """

    def __init__(self, model: Any, config: EngineConfig | None = None, tokenizer: Any = None, *,
                 eos_token_id: int | list[int] | None = None, **config_kwargs: Any) -> None:
        self.config = cfg = EngineConfig.from_kwargs(config, **config_kwargs)
        self.runner, num_gpu_blocks, num_cpu_blocks = make_runner(model, cfg)
        self.tokenizer = tokenizer
        max_len, vocab, eos = model_limits(self.runner, tokenizer)
        if cfg.max_model_len is not None and max_len is not None and cfg.max_model_len > max_len:
            raise ValueError(f"EngineConfig.max_model_len ({cfg.max_model_len}) exceeds the "
                             f"model's {max_len} positions")
        self.max_model_len = cfg.max_model_len or max_len
        self.vocab_size = vocab
        if eos_token_id is not None:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids: set[int] = set(eos)
        self.block_manager = BlockManager(num_gpu_blocks, cfg.block_size, num_cpu_blocks,
                                          enable_prefix_caching=cfg.enable_prefix_caching,
                                          watermark=cfg.watermark)
        self.scheduler = Scheduler(cfg, self.block_manager, self.max_model_len)
        self.decode_graphs = maybe_capture_graphs(self.runner, cfg, self.max_model_len)
        self.device = torch.device(getattr(self.runner, "device", "cpu"))
        self.sampler = Sampler(cfg.seed, self.device)
        self.metrics = EngineMetrics(self)
        self.outputs = OutputBuilder(tokenizer)
        self._groups: dict[str, SequenceGroup] = {}
        self._order = itertools.count()
        #: the launched steps whose tokens are not read yet (async scheduling)
        self._inflight: LaunchedChain | None = None
        self._last_complete = 0.0
        self._can_overlap = cfg.async_scheduling and bool(getattr(self.runner, "supports_pending_tokens", False))
        self._threaded_launch = (self._can_overlap and cfg.threaded_graph_launch
                                 and callable(getattr(self.runner, "execute_async", None)))
        self._num_steps = cfg.num_scheduler_steps if self._can_overlap else 1
        #: whether step() also returns unfinished requests' outputs (False: finished ones only)
        self.stream_outputs = True

    @property
    def num_scheduler_steps(self) -> int:
        """The most decode steps one schedule runs (``config.num_scheduler_steps``, or 1 where
        steps are not overlapped: ``async_scheduling`` off or a runner without pending tokens)."""
        return self._num_steps

    # ---------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    sampling_params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request (a prompt string, which needs a tokenizer, or its token ids)."""
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already running")
        if prompt_token_ids is None and prompt is not None and not isinstance(prompt, str):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("add_request needs a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass tokenizer= or token ids")
            prompt_token_ids = self.tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"request {request_id!r}: prompt token ids must be in "
                             f"[0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer")
        gen = self.sampler.make_generator(params.seed) if params.seed is not None else None
        g = SequenceGroup(request_id, prompt, ids, params, arrival_time, next(self._order), gen)
        if self.config.enable_prefix_caching:
            g.block_hashes = hash_prompt_blocks(ids, self.config.block_size)  # off the scheduling path
        self._groups[request_id] = g
        self.scheduler.add(g)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's blocks; only while no request is unfinished (returns
        whether it was reset)."""
        if self.has_unfinished_requests() or self._inflight is not None:
            return False
        return self.block_manager.reset_prefix_cache()

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; whether it was unfinished."""
        g = self._groups.pop(request_id, None)
        if g is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # -------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; outputs of the requests that finished and (when
        ``stream_outputs``) of those that got new tokens.

        With ``async_scheduling``, a step whose sequences need no host decision after sampling
        (no beam search, no parallel samples still to fork) is left running: the next call
        schedules and launches the following step, feeding it the sampled ids on the device, and
        only then reads this one's tokens. Outputs then arrive one call later.
        """
        results: list[RequestOutput] = []
        inflight, self._inflight = self._inflight, None
        out = self.scheduler.schedule(allow_preemption=inflight is None, num_steps=self._num_steps)
        if out.is_empty and inflight is not None:
            results += self._complete_chain(inflight, None)
            inflight = None
            ignored = out.ignored  # (requests the first call finished with an error)
            out = self.scheduler.schedule()
            out.ignored[:0] = ignored
        results += [self._finish_output(g) for g in out.ignored]
        if out.is_empty:  # (nothing is in flight here: an in-flight step was read above)
            stuck = self._unstick(out)
            if stuck is not None:
                results.append(stuck)
            self.metrics.record_step(out, 0, 0.0)
            return results
        runner = self.runner
        if out.blocks_to_swap_out:
            runner.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            runner.swap_in(out.blocks_to_swap_in)
        if out.blocks_to_copy:
            runner.copy_blocks(out.blocks_to_copy)
        # The in-flight step's tokens are read while the forward just started runs (with
        # threaded_graph_launch, while a worker thread is still launching its CUDA graph).
        def read_inflight(pending: list[tuple[Sequence, int]]) -> None:
            if inflight is not None:
                results.extend(self._complete_chain(inflight, pending))

        launched = self._launch(out, inflight, read_inflight)
        if launched.overlappable and not out.stalled:
            self._inflight = launched
        else:
            results += self._complete_chain(launched, None)
        return results

    def _launch(self, out: SchedulerOutput, prev: LaunchedChain | None,
                while_running: Callable[[list[tuple[Sequence, int]]], None]) -> LaunchedChain:
        """Start the step's forward, call ``while_running(pending inputs)``, then queue its
        sampling; no host sync. A multi-step schedule queues every step's forward and sampling
        before ``while_running``."""
        step_input, pending = build_step_input(out, self.block_manager, prev)
        if out.num_steps > 1:
            logits = self.runner.execute(step_input)
            chain = self._launch_steps(out, step_input, pending, logits)
            while_running(pending)
            return chain
        if self._threaded_launch:
            get_logits = self.runner.execute_async(step_input)
            while_running(pending)
            logits = get_logits()
        else:
            logits = self.runner.execute(step_input)
            while_running(pending)
        rows: list[int] = []
        params: list[SamplingParams] = []
        gens: list[torch.Generator | None] = []
        targets: list[tuple[SequenceGroup, Sequence]] = []
        last_flags: list[bool] = []  # per sample: its token is the sequence's last by length
        beams: dict[int, tuple[SequenceGroup, list[int]]] = {}
        touched: dict[int, SequenceGroup] = {}
        overlappable = self._can_overlap
        max_len = self.max_model_len
        now = time.monotonic()
        add_row, add_params, add_gen, add_target, add_last = (rows.append, params.append, gens.append,
                                                              targets.append, last_flags.append)
        for i, x in enumerate(out.seqs):
            g, seq = x.group, x.seq
            if g.first_scheduled_time is None:
                g.first_scheduled_time = now
            seq.num_computed_tokens = computed = x.num_computed + x.num_new_tokens
            if computed != len(seq.token_ids) + seq.num_pending:
                continue  # a prompt chunk before the last: nothing to sample
            touched[id(g)] = g
            if g.beam is not None:
                beams.setdefault(id(g), (g, []))[1].append(i)
                overlappable = False
                continue
            p = g.params
            if g.forked and (g.generator is None or len(g.seqs) == 1):
                add_row(i)
                add_params(p)
                add_gen(g.generator)
                add_target((g, seq))
                add_last(x.last_step(max_len) <= 0)
                continue
            # Host work first: the samples fork the prompt's sequence; or seeded samples share
            # their request's generator, which a sibling's row after its stop would advance.
            overlappable = False
            for _ in range(1 if g.forked else p.num_seqs):
                add_row(i)
                add_params(p)
                add_gen(g.generator)
                add_target((g, seq))
        sample = self.sampler.launch(logits, params, gens, rows) if rows else None
        counted: list[bool] = []
        if overlappable:
            # The next step may run these sequences before their tokens are read: count each
            # token as pending unless it is the sequence's last by length (then it is not run).
            counted = [not last for last in last_flags]
            for (_, seq), c in zip(targets, counted):
                if c:
                    seq.num_pending += 1
        return LaunchedChain([LaunchedStep(out, sample, targets, counted, beams, list(touched.values()),
                                           logits if beams else None, pending, overlappable, time.perf_counter())])

    def _complete(self, launched: LaunchedStep, next_pending: list[tuple[Sequence, int]] | None
                  ) -> list[RequestOutput]:
        """Read a launched step's tokens and apply them: append, stop, fork, beams, retire.

        ``next_pending`` are the inputs of the step launched after it that are this step's tokens
        (``(seq, row of this step's samples)``): the allocator gets their ids (to hash the blocks
        they filled) before anything is freed.
        """
        out = launched.out
        num_new = 0
        res = launched.sample.result() if launched.sample is not None else None
        if next_pending:
            self._set_pending_tokens(launched, next_pending)
        if res is not None:
            samples: dict[int, list] = {}
            counted = launched.counted
            toks, lps, tops = res.token_ids, res.logprobs, res.top_logprobs
            append = self._append_token
            at = launched.rows
            for j, (g, seq) in enumerate(launched.targets):
                if counted and counted[j]:
                    seq.num_pending -= 1
                if seq.status.finished:  # it stopped on an earlier token, or was aborted
                    continue
                r = at[j] if at is not None else j
                if g.forked:
                    append(g, seq, toks[r], lps[r], tops[r])
                else:
                    samples.setdefault(id(g), [g, seq]).append((toks[r], lps[r], tops[r]))
                num_new += 1
            for g, parent, *draws in samples.values():
                # best_of samples of a prompt: fork its sequence (blocks shared, copy on write).
                seqs = [parent]
                for j in range(1, len(draws)):
                    child = parent.fork(j)
                    self.block_manager.fork(parent.seq_id, child.seq_id)
                    seqs.append(child)
                g.seqs = seqs
                g.forked = True
                for seq, r in zip(seqs, draws):
                    self._append_token(g, seq, *r)
        now = time.monotonic()
        for g, idx in launched.beams.values():
            g.first_token_time = g.first_token_time or now
            if idx:
                beam_step(g, launched.logits[idx], self._stop_ids(g), self.block_manager,
                          self.scheduler.free_seq, self.max_model_len)
                num_new += g.num_live
        results = []
        stream, sampled = self.stream_outputs, res is not None
        for g in launched.touched:
            seqs = g.seqs
            if sampled and g.beam is None and (len(seqs) != 1 or seqs[0].status.finished):
                self._retire_finished(g)  # (beam groups retire in beam_step)
                seqs = g.seqs
            if not seqs:  # the group finished
                if self._groups.get(g.request_id) is g:  # not aborted meanwhile (its id may be reused)
                    self.scheduler.remove_finished(g)
                    results.append(self._finish_output(g))
            elif stream:
                results.append(self.outputs.build(g, self.scheduler.max_model_len))
        end = time.perf_counter()
        self.metrics.record_step(out, num_new, end - max(launched.start, self._last_complete))
        self._last_complete = end
        return results

    def _set_pending_tokens(self, launched: LaunchedStep, feeds: list[tuple[Sequence, int]], offset: int = 0) -> None:
        """Give the allocator the ids of its pending tokens that are ``launched``'s samples:
        ``feeds`` are ``(seq, row + offset)`` (rows of its samples), before anything is freed."""
        mgr = self.block_manager
        live = [f for f in feeds if f[0].seq_id in mgr]
        if live:
            toks = launched.sample.result().token_ids
            mgr.set_last_tokens([f[0].seq_id for f in live], [toks[f[1] - offset] for f in live])

    def _unstick(self, out: SchedulerOutput) -> RequestOutput | None:
        """Nothing could be scheduled and nothing runs: the head request can never run."""
        s = self.scheduler
        if out.preempted or s.running or not (s.waiting or s.swapped):
            return None
        queue = s.swapped if s.swapped else s.waiting
        g = queue[0]
        queue.remove(g)
        g.error = (f"request {g.request_id!r} cannot be scheduled: its "
                   f"{max(len(x.token_ids) for x in g.seqs)} tokens do not fit the KV cache or "
                   f"the step's token budget")
        s.finish_group(g, SequenceStatus.FINISHED_IGNORED)
        return self._finish_output(g)

    def _finish_output(self, g: SequenceGroup) -> RequestOutput:
        self._groups.pop(g.request_id, None)
        g.finished_time = time.monotonic()
        self.metrics.record_finished(g)
        return self.outputs.build(g, self.scheduler.max_model_len)


    # ------------------------------------------------------------------------ post-process
    def _stop_ids(self, g: SequenceGroup) -> set[int]:
        ids = set(g.params.stop_token_ids)
        if not g.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def _append_token(self, g: SequenceGroup, seq: Sequence, tok: int, lp: float,
                      top: dict[int, float] | None) -> None:
        seq.token_ids.append(tok)
        seq.cumulative_logprob += lp
        if seq.logprobs is not None:
            seq.logprobs.append(top if top is not None else {tok: lp})
        if g.first_token_time is None:
            g.first_token_time = time.monotonic()
        p = g.params
        if not p.ignore_eos and tok in self.eos_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif tok in p.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, tok
        elif p.stop and self.outputs.check_stop_strings(seq, p):
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif len(seq.token_ids) - seq.prompt_len >= p.max_tokens or (
                self.max_model_len is not None and len(seq.token_ids) >= self.max_model_len):
            seq.status = SequenceStatus.FINISHED_LENGTH

    def _retire_finished(self, g: SequenceGroup) -> None:
        """Free the group's finished sequences (kept in ``finished_seqs``)."""
        live = []
        for s in g.seqs:
            if s.status.finished:
                self.scheduler.free_seq(s)
                g.finished_seqs.append(s)
            else:
                live.append(s)
        g.seqs = live
