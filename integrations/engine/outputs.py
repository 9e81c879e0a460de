"""Building :class:`RequestOutput` objects: text, stop strings, ordering of completions."""

from __future__ import annotations

from typing import Any

from pagedattn.integrations.engine.sampling import SamplingParams
from pagedattn.integrations.engine.sequence import (
    CompletionOutput,
    RequestOutput,
    Sequence,
    SequenceGroup,
)

__all__ = ["OutputBuilder"]


class OutputBuilder:
    """Turns sequence groups into outputs; decodes text when there is a tokenizer."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None or not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def text(self, seq: Sequence) -> str:
        """The sequence's output text (cached per length; frozen once a stop string cut it)."""
        if seq._text_len < 0 or seq._text_len == len(seq.token_ids):
            return seq.text
        seq.text = self.decode(seq.output_token_ids)
        seq._text_len = len(seq.token_ids)
        return seq.text

    def check_stop_strings(self, seq: Sequence, params: SamplingParams) -> bool:
        """Whether the output text now contains a stop string; cuts ``seq.text`` there."""
        text = self.text(seq)
        for stop in params.stop:
            i = text.find(stop)
            if i >= 0:
                seq.text = text[:i + len(stop)] if params.include_stop_str_in_output else text[:i]
                seq._text_len = -1
                seq.stop_reason = stop
                return True
        return False

    def build(self, g: SequenceGroup, max_model_len: int | None = None) -> RequestOutput:
        p = g.params
        finished = g.is_finished
        outputs: list[CompletionOutput] = []
        if g.beam is not None and g.error is None:
            if finished:
                for i, (_, toks, cum, reason) in enumerate(g.beam.finished[:p.n]):
                    outputs.append(CompletionOutput(i, self.decode(toks), list(toks), cum, None,
                                                    reason))
        else:
            seqs = sorted(g.finished_seqs + g.seqs, key=lambda s: s.index)
            if finished and (p.best_of or p.n) > p.n and g.error is None:
                seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:p.n]
            for s in seqs:
                outputs.append(CompletionOutput(
                    s.index, self.text(s), s.output_token_ids, s.cumulative_logprob,
                    list(s.logprobs) if s.logprobs is not None else None,
                    s.status.finish_reason, s.stop_reason))
        metrics = {"arrival_time": g.arrival_time, "first_scheduled_time": g.first_scheduled_time,
                   "first_token_time": g.first_token_time, "finished_time": g.finished_time,
                   "num_preemptions": g.num_preemptions}
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outputs, finished,
                             g.error, metrics)
