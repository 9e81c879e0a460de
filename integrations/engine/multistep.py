"""Multi-step decode: several decode steps launched from one schedule and read in order.

A schedule with ``num_steps > 1`` (see :meth:`Scheduler.schedule`) appended every step's slots;
the engine queues step 0's forward, then each step's sampling and the next step's forward, whose
input ids are the previous step's samples on the device (``pending_src``), with no host sync.
The steps are read later, in order, as a :class:`LaunchedChain`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pagedattn.integrations.engine.launched import LaunchedChain, LaunchedStep, build_substep_input
from pagedattn.integrations.engine.runner import StepInput
from pagedattn.integrations.engine.sampling import SamplingParams
from pagedattn.integrations.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    import torch
    from pagedattn.integrations.engine.sequence import RequestOutput, Sequence

__all__ = ["MultiStepMixin"]

#: sampling of the rows of a multi-step schedule's later steps whose sequence has ended
_PADDING_PARAMS = SamplingParams(temperature=0.0)


class MultiStepMixin:
    """``LLMEngine``'s launch and read of a multi-step schedule (needs its runner, sampler,
    block manager, ``max_model_len``, ``_complete`` and ``_set_pending_tokens``)."""

    def _launch_steps(self, out: SchedulerOutput, first: StepInput, pending: list[tuple[Sequence, int]],
                      logits: torch.Tensor) -> LaunchedChain:
        """Queue the sampling of a multi-step schedule's step 0 (its forward queued), then each
        later step's forward (its inputs step ``j - 1``'s samples) and sampling.

        The later steps reuse step 0's ``(group, seq)`` and ``(seq, row)`` tuples (filtered where
        sequences end sooner): few new objects a step, so the garbage collector stays idle.
        """
        now = time.monotonic()
        block_size = self.block_manager.block_size
        seqs = out.seqs
        all_targets = [(x.group, x.seq) for x in seqs]
        all_feeds = [(x.seq, i) for i, x in enumerate(seqs)]  # step j's inputs: step j - 1's rows
        all_touched = list({id(x.group): x.group for x in seqs}.values())
        all_params = [x.group.params for x in seqs]
        all_gens = [x.group.generator for x in seqs]
        steps: list[LaunchedStep] = []
        prev: LaunchedStep | None = None
        for j in range(out.num_steps):
            sample_rows, rows, targets, touched = None, seqs, all_targets, all_touched
            params, gens = all_params, all_gens
            if j:
                if any(x.num_steps <= j for x in seqs):  # some sequences ended: their rows are padding
                    sample_rows = [i for i, x in enumerate(seqs) if x.num_steps > j]
                    rows = [seqs[i] for i in sample_rows]
                    targets = [all_targets[i] for i in sample_rows]
                    pending = [all_feeds[i] for i in sample_rows]
                    touched = list({id(x.group): x.group for x in rows}.values())
                    # every row is sampled (a row list would be one more upload): the padding
                    # rows greedily, without advancing a generator, their tokens dropped
                    params = [x.group.params if x.num_steps > j else _PADDING_PARAMS for x in seqs]
                    gens = [x.group.generator if x.num_steps > j else None for x in seqs]
                else:
                    pending = all_feeds
                step_input = build_substep_input(out, first, block_size, j, prev.sample.ids)
                logits = self.runner.execute(step_input)
                sub = SchedulerOutput(seqs=rows, num_batched_tokens=len(rows), num_decode_tokens=len(rows))
            else:
                sub = out
                for x in seqs:
                    g = x.group
                    if g.first_scheduled_time is None:
                        g.first_scheduled_time = now
                    x.seq.num_computed_tokens = x.num_computed + x.num_steps
            sample = self.sampler.launch(logits, params, gens)
            counted = []
            max_len = self.max_model_len
            for x in rows:
                # step j's sample is pending (an input of the next step or schedule) unless it is the
                # sequence's last; only its final step's can be (the scheduler's step count)
                c = j + 1 < x.num_steps or x.last_step(max_len) > j
                counted.append(c)
                x.seq.num_pending += c
            prev = LaunchedStep(sub, sample, targets, counted, {}, touched, None, pending,
                                True, time.perf_counter(), sample_rows)
            steps.append(prev)
        return LaunchedChain(steps)

    def _complete_chain(self, chain: LaunchedChain, next_pending: list[tuple[Sequence, int]] | None
                        ) -> list[RequestOutput]:
        """:meth:`_complete` each step of ``chain`` in order; ``next_pending`` are the inputs of the
        step launched after it that are its samples (``(seq, row of chain.ids())``)."""
        steps = chain.steps
        if len(steps) == 1:
            return self._complete(steps[0], next_pending)
        per_step = chain.split_pending(next_pending) if next_pending else None
        results = []
        for j, st in enumerate(steps):
            if per_step is not None and per_step[j][0]:
                # inputs of the next schedule's first step: rows of chain.ids(), this step's from
                # its offset on
                feeds, offset = per_step[j]
                self._set_pending_tokens(st, feeds, offset)
            results += self._complete(st, steps[j + 1].pending if j + 1 < len(steps) else None)
        return results
