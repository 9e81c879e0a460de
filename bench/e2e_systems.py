"""The systems of the end-to-end benchmark, each run in its own process by ``bench/bench_e2e.py``.

Every ``run_*`` takes (model path, workload dict, device, emit) and calls ``emit(result)`` whenever it
has something worth keeping (the orchestrator reads the last one even after a timeout). The
workload's ``params`` carry the per-system knobs; ``params["deadline"]`` is a ``time.time()`` after
which a run stops early and records what it has (``"partial": true``).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from bench.workloads import _dtype, _mem, _pct, _sync


# ------------------------------------------------------------------------------ our engine
def _make_llm(path: str, dev: str, params: dict, **kw):
    """The engine of a stage, with its ``engine_kwargs`` / ``engine_overrides`` (EngineConfig fields)."""
    from pagedattn.integrations.engine import LLM

    cfg = dict(device=dev, dtype=_dtype(dev), block_size=params.get("block_size", 16),
               num_gpu_blocks=None if dev.startswith("cuda") else params.get("cpu_blocks", 2048),
               max_model_len=params.get("max_model_len", 2048))
    cfg.update(params.get("engine_kwargs", {}))
    cfg.update(params.get("engine_overrides", {}))
    cfg.update(kw)
    return LLM(path, **cfg)


def _warmup_engine(llm, w: dict) -> None:
    from pagedattn.integrations.engine import SamplingParams

    prompts = [p[:32] for p in w["prompts"][:8]] + [max(w["prompts"], key=len)]  # short and longest prompts
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.metrics.reset()


def _pool_info(llm) -> dict:
    r = llm.engine.runner
    blocks = llm.engine.block_manager.num_gpu_blocks
    return {"kv_pool_blocks": blocks, "kv_pool_gib": blocks * r.kv_cache_bytes_per_block / 2**30}


def _timed_run(llm, prompts: list, output_lens: list, deadline: float, dev: str) -> dict:
    """Every request at once, timed to the last output; Fig. 2's KV-slot sums every 4th step."""
    from pagedattn.integrations.engine import SamplingParams

    eng, mgr = llm.engine, llm.engine.block_manager
    eng.stream_outputs = False
    if not llm.reset_prefix_cache():  # no prompt's blocks from the warm-up or an earlier run
        raise RuntimeError("the engine still has requests: cannot reset its prefix cache")
    llm.metrics.reset()
    bs, max_len = mgr.block_size, eng.max_model_len or 2048
    reserve = {}
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        eng.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        reserve[str(i)] = len(prompt) + n
    stored = alloc = res_oracle = res_max = 0.0
    finish, tokens, errors, partial = {}, 0, 0, False
    _sync(dev)
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finish[out.request_id] = time.perf_counter() - t0
                tokens += len(out.outputs[0].token_ids)
                errors += out.error is not None
        used = mgr.num_gpu_blocks - mgr.num_free_blocks if eng.metrics.num_steps % 4 == 0 else 0
        if used:  # Fig. 2, every 4th step: token slots holding tokens vs allocated vs a contiguous reservation
            st = mgr.kv_utilization() * used * bs
            running = [g.request_id for g in eng.scheduler.running]
            stored += st
            alloc += used * bs
            res_oracle += sum(reserve[r] for r in running)
            res_max += len(running) * max_len
        if time.time() > deadline:
            partial = True
            break
    _sync(dev)
    elapsed = time.perf_counter() - t0
    if partial:  # leave nothing running for a later run of the same engine
        for rid in list(reserve):
            eng.abort(rid)
        while eng.has_unfinished_requests():
            eng.step()
    m = llm.metrics.summary()
    return {"status": "ok", "partial": partial, "requests": len(prompts), "completed": len(finish),
            "errors": errors, "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tokens_per_s": (m["output_tokens"] if partial else tokens) / elapsed,
            "latency_s": _pct(list(finish.values())), "kv_utilization_mean": m["kv_utilization_mean"],
            "fig2": {"paged_utilization": stored / alloc if alloc else None,
                     "contiguous_prompt_plus_max_tokens_utilization": stored / res_oracle if res_oracle else None,
                     "contiguous_max_model_len_utilization": stored / res_max if res_max else None,
                     "max_model_len": max_len, "block_size": bs},
            "engine_metrics": m}


def run_engine(path: str, w: dict, dev: str, emit) -> None:
    """All requests at once: output tokens/s, latency percentiles, and Fig. 2's KV-slot figures.

    With ``params["first_n"]``, the same engine first runs the workload's first ``first_n`` requests
    alone (recorded under ``"first_n"``: the requests the transformers stages run), then all of them.
    """
    p = w["params"]
    llm = _make_llm(path, dev, p)
    _warmup_engine(llm, w)
    first = None
    n = p.get("first_n")
    if n and n < len(w["prompts"]):
        first = _timed_run(llm, w["prompts"][:n], w["output_lens"][:n], p["deadline"], dev)
        first.pop("fig2")
        first.pop("engine_metrics")
        emit({"status": "ok", "partial": True, "output_tokens_per_s": 0.0, "first_n": first})
    res = _timed_run(llm, w["prompts"], w["output_lens"], p["deadline"], dev)
    if first is not None:
        res["first_n"] = first
    emit({**res, **_pool_info(llm), **_mem(dev)})


def run_engine_latency(path: str, w: dict, dev: str, emit) -> None:
    """Poisson arrivals through add_request / step(): normalized latency (s per output token)."""
    from pagedattn.integrations.engine import SamplingParams

    p = w["params"]
    llm = _make_llm(path, dev, p)
    _warmup_engine(llm, w)
    eng = llm.engine
    eng.stream_outputs = False
    results = []
    rates = p["rates"]
    for k, rate in enumerate(rates):
        left = p["deadline"] - time.time()
        if left < 5:
            results.append({"rate": rate, "status": "skipped (deadline)"})
            continue
        stop_at = time.time() + left / (len(rates) - k)  # an equal share of the time left
        n = min(len(w["prompts"]), max(4, int(rate * p.get("arrival_window_s", 20))))
        rng = np.random.default_rng(w["seed"] + k)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
        arrivals -= arrivals[0]
        t_arr, lat, norm = {}, [], []
        i, partial, tokens = 0, False, 0
        t0 = time.perf_counter()
        while i < n or eng.has_unfinished_requests():
            now = time.perf_counter() - t0
            while i < n and arrivals[i] <= now:
                rid = f"{rate}-{i}"
                eng.add_request(rid, w["prompts"][i], SamplingParams(
                    temperature=0.0, max_tokens=w["output_lens"][i], ignore_eos=True))
                t_arr[rid] = t0 + arrivals[i]
                i += 1
            if eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished:
                        d = time.perf_counter() - t_arr[out.request_id]
                        ntok = max(len(out.outputs[0].token_ids), 1)
                        lat.append(d)
                        norm.append(d / ntok)
                        tokens += ntok
            elif i < n:
                time.sleep(min(arrivals[i] - now, 0.01))
            if time.time() > stop_at:
                partial = True
                for rid in list(t_arr):
                    eng.abort(rid)
                break
        elapsed = time.perf_counter() - t0
        results.append({"rate": rate, "status": "ok", "partial": partial, "requests": n, "completed": len(lat),
                        "normalized_latency_s_per_token": float(np.mean(norm)) if norm else None,
                        "latency_s": _pct(lat), "output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed})
        emit({"status": "ok", "rates": results, **_mem(dev)})
    emit({"status": "ok", "rates": results, **_mem(dev)})


def run_engine_sharing(path: str, w: dict, dev: str, emit) -> None:
    """Fig. 15: KV blocks saved by sharing for parallel sampling (n) and beam search (width)."""
    from pagedattn.integrations.engine import SamplingParams

    p = w["params"]
    llm = _make_llm(path, dev, p, enable_prefix_caching=False)  # sharing by fork / copy-on-write only
    _warmup_engine(llm, w)
    eng, mgr = llm.engine, llm.engine.block_manager
    eng.stream_outputs = False
    bs = mgr.block_size
    settings = p["settings"]
    results = []
    for k, (kind, width) in enumerate(settings):
        left = p["deadline"] - time.time()
        if left < 3:
            results.append({"kind": kind, "width": width, "status": "skipped (deadline)"})
            continue
        stop_at = time.time() + left / (len(settings) - k)
        ids = []
        for i, (prompt, n) in enumerate(zip(w["prompts"], w["output_lens"])):
            if kind == "beam":
                sp = SamplingParams(use_beam_search=True, beam_width=width, n=1, temperature=0.0,
                                    max_tokens=n, ignore_eos=True)
            else:
                sp = SamplingParams(n=width, temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
            rid = f"{kind}{width}-{i}"
            eng.add_request(rid, prompt, sp)
            ids.append(rid)
        used_sum = unshared_sum = 0
        used_peak = unshared_peak = 0
        partial, done, t0 = False, 0, time.perf_counter()
        while eng.has_unfinished_requests():
            done += sum(o.finished for o in eng.step())
            used = mgr.num_gpu_blocks - mgr.num_free_blocks
            unshared = sum(-(-mgr.get_num_tokens(s) // bs) for s in mgr.seq_ids() if not mgr.is_swapped(s))
            used_sum += used
            unshared_sum += unshared
            used_peak, unshared_peak = max(used_peak, used), max(unshared_peak, unshared)
            if time.time() > stop_at:
                partial = True
                for rid in ids:
                    eng.abort(rid)
                break
        results.append({"kind": kind, "width": width, "status": "ok", "partial": partial,
                        "requests": len(ids), "completed": done, "elapsed_s": time.perf_counter() - t0,
                        "saving_mean": 1 - used_sum / unshared_sum if unshared_sum else None,
                        "saving_peak": 1 - used_peak / unshared_peak if unshared_peak else None,
                        "blocks_used_sum": used_sum, "blocks_unshared_sum": unshared_sum})
        emit({"status": "ok", "settings": results, **_mem(dev)})
    emit({"status": "ok", "settings": results, **_mem(dev)})


# ---------------------------------------------------------------------------- transformers
def _load_hf(path: str, dev: str, **kw):
    from transformers import AutoModelForCausalLM

    if dev.startswith("cuda"):
        kw["device_map"] = dev
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dev), **kw).to(dev).eval()
    return model


@torch.no_grad()
def run_hf_generate(path: str, w: dict, dev: str, emit) -> None:
    """``model.generate`` in static left-padded batches (default 32), greedy, EOS off. Useful tokens
    = each request's own length (tokens past it, generated for the batch's longest, don't count)."""
    from transformers import GenerationConfig

    p = w["params"]
    bsz = p.get("batch_size", 32)
    model = _load_hf(path, dev, attn_implementation="sdpa")

    def batch_gen(prompts, max_new, max_time=None):
        L = max(len(x) for x in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for r, x in enumerate(prompts):
            ids[r, L - len(x):] = torch.tensor(x)
            mask[r, L - len(x):] = 1
        gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new if max_time is None
                              else 0, eos_token_id=None, pad_token_id=0, bos_token_id=None, max_time=max_time)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc)
        return out.shape[1] - L

    batch_gen([x[:16] for x in w["prompts"][:4]], 8)  # warm-up
    _sync(dev)
    n = len(w["prompts"])
    useful, steps_all, finish, done = 0, [], [], 0
    partial = False
    t0 = time.perf_counter()
    for s in range(0, n, bsz):
        left = p["deadline"] - time.time()
        if left < 2:
            partial = True
            break
        lens = w["output_lens"][s:s + bsz]
        steps = batch_gen(w["prompts"][s:s + bsz], max(lens), max_time=left - 1)
        _sync(dev)
        useful += sum(min(x, steps) for x in lens)
        steps_all.append(steps)
        if steps >= max(lens):
            done += len(lens)
            finish += [time.perf_counter() - t0] * len(lens)
        else:
            partial = True
            break
    elapsed = time.perf_counter() - t0
    emit({"status": "ok", "partial": partial, "requests": n, "completed": done, "batch_size": bsz,
          "batches_run": len(steps_all), "steps_per_batch": steps_all, "output_tokens": useful,
          "elapsed_s": elapsed, "output_tokens_per_s": useful / elapsed if elapsed else None,
          "latency_s": _pct(finish), **_mem(dev)})


def run_hf_cb(path: str, w: dict, dev: str, emit) -> None:
    """transformers' continuous batching through its manager (per-request ``max_new_tokens``)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    p = w["params"]
    kw = dict(p.get("cb_config", {}))
    if not dev.startswith("cuda"):  # its memory sizing reads free GPU memory
        kw.setdefault("num_blocks", 256)
        kw.setdefault("max_batch_tokens", 256)
        kw.pop("use_cuda_graph", None)
        kw.pop("max_memory_percent", None)
        from transformers.generation.continuous_batching import cache as _cb_cache

        # without psutil it sees 0 bytes of CPU memory: give it 8 GiB (dry run only)
        _cb_cache.get_device_and_memory_breakdown = lambda: (torch.device("cpu"), 8 * 2**30, 0, 0)
    model = _load_hf(path, dev)
    gc = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, bos_token_id=None,
                          max_new_tokens=max(w["output_lens"]))
    cbc = ContinuousBatchingConfig(**kw)
    n = len(w["prompts"])
    finish, tokens, errors, partial, cb_error = [], 0, 0, False, None
    with model.continuous_batching_context_manager(generation_config=gc, continuous_batching_config=cbc) as m:
        for i in range(4):  # warm-up
            m.add_request(w["prompts"][i][:16], request_id=f"warm{i}", max_new_tokens=8, eos_token_id=-1)
        got = 0
        while got < 4 and time.time() < p["deadline"]:
            r = m.get_result(timeout=1.0)
            got += r is not None and r.is_finished()
        _sync(dev)
        t0 = time.perf_counter()
        for i, (prompt, nt) in enumerate(zip(w["prompts"], w["output_lens"])):
            m.add_request(prompt, request_id=str(i), max_new_tokens=nt, eos_token_id=-1)
        while len(finish) < n:
            if time.time() > p["deadline"]:
                partial = True
                break
            r = m.get_result(timeout=0.5)
            fatal = getattr(getattr(m, "background_thread_status", None), "fatal_error", None)
            if r is None and fatal is not None:
                partial, cb_error = True, repr(fatal)[:2000]
                break
            if r is None or not r.is_finished():
                continue
            finish.append(time.perf_counter() - t0)
            tokens += len(r.generated_tokens)
            errors += r.error is not None
        last = finish[-1] if finish else time.perf_counter() - t0
        res = {"status": "ok", "partial": partial, "requests": n, "completed": len(finish), "errors": errors,
               "output_tokens": tokens, "elapsed_s": last,
               "output_tokens_per_s": tokens / last if last > 0 else None, "cb_config": kw,
               "cb_fatal_error": cb_error,
               "latency_s": _pct(finish), **_mem(dev)}
        emit(res)
        if partial:  # don't wait for the rest on the manager's exit
            sys.stdout.flush()
            os._exit(0)
    emit(res)


from bench.e2e_profile import run_engine_profile  # noqa: E402  (it imports helpers from this module)

SYSTEMS = {"engine": run_engine, "engine_profile": run_engine_profile, "engine_latency": run_engine_latency, "engine_sharing": run_engine_sharing,
           "hf_generate": run_hf_generate, "hf_cb": run_hf_cb}
