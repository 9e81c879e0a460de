"""Seeded workloads and random-weight models for the end-to-end benchmark (``bench/bench_e2e.py``).

Workloads are token-id prompts with per-request output lengths drawn from log-normal
distributions with the vLLM paper's means (ShareGPT-like: 161 prompt / 338 output tokens;
Alpaca-like: 19 / 58), each length capped at 1024. ``arrivals`` are all 0 (throughput runs) or a
Poisson process (latency runs). Models are Llama configs with random bf16 weights, saved once with
``save_pretrained`` and loaded by every system with ``from_pretrained`` (no download).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

#: name -> (mean prompt tokens, mean output tokens, log-normal sigma of both)
DATASETS = {
    "sharegpt": (161, 338, 0.9),
    "alpaca": (19, 58, 0.7),
}
LENGTH_CAP = 1024

#: Llama shapes (random weights). "tiny" is the CPU dry-run shape.
MODELS = {
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=2048),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=2048),
}


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int, cap: int) -> list[int]:
    """Integers with a log-normal distribution of the given mean (before the cap), in [1, cap]."""
    mu = math.log(mean) - sigma ** 2 / 2
    x = rng.lognormal(mu, sigma, n)
    return np.clip(np.round(x), 1, cap).astype(int).tolist()


def make_workload(dataset: str, num_requests: int, seed: int, vocab_size: int, rate: float | None = None,
                  cap: int = LENGTH_CAP, scale: float = 1.0) -> dict:
    """A workload: ``prompts`` (token ids), ``output_lens``, ``arrivals`` (seconds from the start).

    Args:
        dataset: ``"sharegpt"`` or ``"alpaca"``.
        rate: requests per second of a Poisson process, or ``None`` for all at time 0.
        cap: longest prompt and longest output.
        scale: multiplies both means (the dry run shrinks lengths).
    """
    p_mean, o_mean, sigma = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    p_lens = _lognormal(rng, p_mean * scale, sigma, num_requests, cap)
    o_lens = _lognormal(rng, o_mean * scale, sigma, num_requests, cap)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in p_lens]
    if rate is None:
        arrivals = [0.0] * num_requests
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests)).tolist()
        arrivals = [a - arrivals[0] for a in arrivals]
    return {"dataset": dataset, "seed": seed, "rate": rate, "num_requests": num_requests,
            "prompts": prompts, "output_lens": o_lens, "arrivals": arrivals,
            "mean_prompt_len": float(np.mean(p_lens)), "mean_output_len": float(np.mean(o_lens)),
            "total_output_tokens": int(sum(o_lens))}


def subset(w: dict, n: int) -> dict:
    """The first ``n`` requests of a workload."""
    out = dict(w)
    for k in ("prompts", "output_lens", "arrivals"):
        out[k] = w[k][:n]
    out["num_requests"] = len(out["prompts"])
    out["total_output_tokens"] = int(sum(out["output_lens"]))
    return out


def save_workload(w: dict, path: str | Path) -> str:
    Path(path).write_text(json.dumps(w))
    return str(path)


def load_workload(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def build_model(name: str, path: str | Path, device: str = "cuda", seed: int = 0) -> str:
    """Save a random-weight Llama of shape ``name`` under ``path`` (once) and return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = str(path)
    if os.path.exists(os.path.join(path, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        return path
    shape = dict(MODELS[name])
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------- helpers of the worker processes
def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        _torch().cuda.synchronize()


def _mem(dev: str) -> dict:
    if not dev.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": _torch().cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": _torch().cuda.max_memory_reserved() / 2**30}


def _pct(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _dtype(dev: str):
    return _torch().bfloat16 if dev.startswith("cuda") else _torch().float32


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------ report helpers (bench_e2e)
def card_slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


#: a partial run (stopped by its deadline) timed over less than this is no rate (start-up effects)
MIN_PARTIAL_WINDOW_S = 5.0


def usable(r) -> bool:
    """A stage result worth reading: it finished, or it wrote its result before it was killed; a
    partial run only if it was timed over at least ``MIN_PARTIAL_WINDOW_S``."""
    if not (isinstance(r, dict) and "ok" in (r.get("status"), r.get("result_status"))):
        return False
    return not r.get("partial") or (r.get("elapsed_s") or 0.0) >= MIN_PARTIAL_WINDOW_S


_ok = usable


def plot_all(res: dict, out_dir: Path) -> list[Path]:
    """Throughput bars per model, latency vs rate (Fig. 12), sharing savings (Fig. 15)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if isinstance(res.get(m), dict)]
    card = res.get("card", "")
    pngs = []
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5 * max(len(models), 1), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        names, vals = [], []
        nreq = {}
        for key in ("engine_sharegpt", "hf_cb_graphs", "hf_cb_default", "hf_generate"):
            r = res[m].get(key)
            if _ok(r) and r.get("output_tokens_per_s"):
                names.append(key.replace("engine_sharegpt", "pagedattn") + ("*" if r.get("partial") else ""))
                vals.append(r["output_tokens_per_s"])
                nreq[key] = r.get("requests")
        ax.bar(names, vals, color=["C0", "C1", "C2", "C3"][:len(vals)])
        ax.set_yscale("log")
        ax.set_title(f"{m}: ShareGPT-like, output tokens/s\n{card}", fontsize=10)
        ax.set_xlabel(f"pagedattn on {nreq.get('engine_sharegpt', '?')} requests; * partial: a rate over a time "
                      f"slot", fontsize=8)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    pngs.append(out_dir / "e2e_throughput.png")
    fig.savefig(pngs[-1], dpi=120)
    plt.close(fig)
    for m in models:
        lat = res[m].get("engine_latency")
        pts = [(x["rate"], x["normalized_latency_s_per_token"]) for x in (lat or {}).get("rates", [])
               if x.get("normalized_latency_s_per_token") is not None]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.plot(*zip(*pts), "o-", label="pagedattn")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel("normalized latency (s/token)")
            ax.set_title(f"{m}: ShareGPT-like, Poisson arrivals\n{card}", fontsize=10)
            ax.legend()
            fig.tight_layout()
            pngs.append(out_dir / f"e2e_latency_{m}.png")
            fig.savefig(pngs[-1], dpi=120)
            plt.close(fig)
        sh = [s for s in (res[m].get("engine_sharing") or {}).get("settings", []) if s.get("saving_mean") is not None]
        if sh:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.bar([f"{s['kind']}={s['width']}" for s in sh], [100 * s["saving_mean"] for s in sh])
            ax.set_ylabel("KV blocks saved by sharing (%)")
            ax.set_title(f"{m}: Alpaca-like (Fig. 15)\n{card}", fontsize=10)
            fig.tight_layout()
            pngs.append(out_dir / f"e2e_sharing_{m}.png")
            fig.savefig(pngs[-1], dpi=120)
            plt.close(fig)
    return pngs


def print_table(res: dict, figs: dict) -> None:
    f = lambda x, s=",.1f": "-" if x is None else format(x, s)  # noqa: E731
    print(f"\n{'model.stage':<34} {'status':<8} {'done/req':>9} {'tok/s':>10} {'p50 s':>8} {'p99 s':>8} {'peak GiB':>9}")
    for m in MODELS:
        for key, r in (res.get(m) or {}).items():
            if key == "build" or not isinstance(r, dict):
                continue
            lat = r.get("latency_s") or {}
            print(f"{m + '.' + key:<34} {r.get('status', '-'):<8} "
                  f"{str(r.get('completed', '-')) + '/' + str(r.get('requests', '-')):>9} "
                  f"{f(r.get('output_tokens_per_s')):>10} {f(lat.get('p50'), '.2f'):>8} {f(lat.get('p99'), '.2f'):>8} "
                  f"{f(r.get('peak_allocated_gib'), '.1f'):>9}"
                  + ("  (partial)" if r.get("partial") else "") + (f"  {r.get('reason', '')}" if r.get("reason") else ""))
            for x in r.get("rates", []) + r.get("settings", []):
                print(f"    {x}")
            if "fig2" in r:
                print(f"    fig2: {r['fig2']}")
    print("\nheadline figures:")
    for k, (v, goal) in figs.items():
        print(f"  {k:<28} {v:10.4f}   goal {goal}")
