"""The offline entry point: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import os
from typing import Any

from pagedattn.integrations.engine.config import EngineConfig
from pagedattn.integrations.engine.engine import LLMEngine
from pagedattn.integrations.engine.runner import is_runner
from pagedattn.integrations.engine.sampling import SamplingParams
from pagedattn.integrations.engine.sequence import RequestOutput

__all__ = ["LLM"]

#: Files whose presence says a checkpoint folder carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(model: Any) -> Any:
    """The tokenizer saved with ``model`` (a path / hub id, or a model's ``name_or_path``)."""
    source = model if isinstance(model, (str, os.PathLike)) else None
    if source is None:
        source = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if not source:
        return None
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, name)) for name in TOKENIZER_FILES):
        # transformers would build an empty default tokenizer (with a made-up EOS id) from a folder
        # that holds none: the model is served with token ids only
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception:  # no tokenizer files: token ids only
        return None


class LLM:
    """Generate with continuous batching over a paged KV cache.

    Args:
        model: a checkpoint path or hub id, a loaded transformers model, or a model runner.
        tokenizer: a tokenizer, a path / hub id to load one from, or ``None`` to load the model's
            own (if it has one; without one, prompts must be token ids).
        **kwargs: :class:`EngineConfig` fields (``num_gpu_blocks``, ``max_num_seqs``, ...) and
            ``eos_token_id``.
    """

    def __init__(self, model: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        eos = kwargs.pop("eos_token_id", None)
        config = EngineConfig.from_kwargs(None, **kwargs)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        elif tokenizer is None and not is_runner(model):
            tokenizer = _load_tokenizer(model)
        self.engine = LLMEngine(model, config, tokenizer, eos_token_id=eos)
        self.engine.stream_outputs = False  # generate() only collects finished requests
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def metrics(self):
        return self.engine.metrics

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (between runs that should not share prompts' blocks); only
        while no request is unfinished. Returns whether it was reset."""
        return self.engine.reset_prefix_cache()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of ``prompts``.

        Args:
            prompts: strings (need a tokenizer) or token-id lists (a single string or a single
                token-id list is one prompt).
            sampling_params: one for all prompts, or one per prompt (default ``SamplingParams()``).
            use_tqdm: show a progress bar (if tqdm is installed).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = str(self._counter)
            self._counter += 1
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        bar = None
        if use_tqdm:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
            except ImportError:
                bar = None
        done: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]
