"""What the combiner's evaluation costs: wall time and forwards per scored token of each evaluator,
measured side by side in one process on the same held-out tokens.

  sliding window (base)          one forward of `window` tokens per `stride` scored tokens
  naive per-token recompute      one forward per scored token (the reference the sliding window is checked against)
  chunked last-position, base    one forward of `chunk` tokens per scored token
  chunked + k thoughts           1 + k forwards per scored token; cached (KV cache continued) vs full recompute
  combiner head                  the mix + head on cached (h, T) features, per scored token

Run:  python bench/bench_combiner.py     (LAB_BENCH_BASE picks the base; default tiny-gpt2, else smoke-gpt2)
"""

from __future__ import annotations

import os
import time

import torch

from lab import LabError
from lab.bases import load_base
from lab.combiner import bpb as B
from lab.combiner.model import Combiner
from lab.combiner.thinking import think
from lab.corpus import heldout_text
from lab.pretrain import ensure_base


def _timed(fn, repeat: int = 2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(base_name: str | None = None) -> dict:
    torch.set_num_threads(1)  # the machine's cores are shared; one thread keeps ratios comparable
    name = base_name or os.environ.get("LAB_BENCH_BASE", "tiny-gpt2")
    try:
        base = load_base(name)
    except LabError:
        name = "smoke-gpt2"
        base = ensure_base(name)
    seq = (base.meta.get("preset") or {}).get("seq_len", 128)
    window, stride, chunk = seq, seq // 4, seq - 8
    ids, nb = B.tokenize_with_bytes(base.tokenizer, heldout_text(400))
    ids, nb = ids[: 40 * chunk + 1], nb[: 40 * chunk + 1]
    res = {"base": name, "tokens": len(ids), "window": window, "stride": stride, "chunk": chunk}

    t_slide, sl = _timed(lambda: B.sliding_window(base, ids, nb, window, stride))
    n_naive = 200
    t_naive, nv = _timed(lambda: B.naive_recompute(base, ids[:n_naive], nb[:n_naive],
                                                   B.context_starts(n_naive, window, stride)), repeat=1)
    t_base, fb = _timed(lambda: _chunk_base(base, ids, chunk))
    rows = {"sliding": (t_slide / len(sl.nats), sl.cost()["forwards_per_token"]),
            "naive": (t_naive / len(nv.nats), 1.0),
            "chunked_base": (t_base / fb, 1.0)}
    for k in (1, 4):
        for cached in ([True, False] if base.arch != "mamba2" else [False]):
            t, f = _timed(lambda: _chunk_think(base, ids, nb, chunk, k, cached))
            rows[f"chunked_k{k}_{'cached' if cached else 'recompute'}"] = (t / len(f), 1.0 + k)
    feats = B.chunk_features(base, ids, nb, chunk, 1)
    comb = Combiner(base.d_model)
    with torch.no_grad():
        comb.M.normal_(0, 0.01)
    t_head, _ = _timed(lambda: B.score_chunks(base, feats, comb, 1), repeat=5)
    rows["combiner_head_only"] = (t_head / len(feats), 0.0)
    for key, (sec, fw) in rows.items():
        res[f"{key}_ms_per_token"] = sec * 1e3
        res[f"{key}_forwards_per_token"] = fw
    ref = rows["chunked_base"][0]
    res["ratio_chunked_k1_cached_vs_base"] = rows.get("chunked_k1_cached", rows["chunked_k1_recompute"])[0] / ref
    res["ratio_chunked_k4_recompute_vs_base"] = rows["chunked_k4_recompute"][0] / ref
    if "chunked_k1_cached" in rows:
        res["ratio_k4_recompute_vs_cached"] = rows["chunked_k4_recompute"][0] / rows["chunked_k4_cached"][0]
    res["ratio_naive_vs_sliding_per_token"] = rows["naive"][0] / rows["sliding"][0]
    res["ratio_chunked_base_vs_sliding_per_token"] = ref / rows["sliding"][0]
    res["ratio_combiner_head_vs_chunked_base"] = rows["combiner_head_only"][0] / ref
    return res


@torch.no_grad()
def _chunk_base(base, ids, chunk):
    n = (len(ids) - 1) // chunk
    x = torch.from_numpy(ids[: n * chunk]).view(n, chunk)
    for s in range(0, n, 32):
        base.model(input_ids=x[s: s + 32])
    return n


def _chunk_think(base, ids, nb, chunk, k, cached):
    n = (len(ids) - 1) // chunk
    x = torch.from_numpy(ids[: n * chunk]).view(n, chunk)
    for s in range(0, n, 32):
        think(base, x[s: s + 32], k, cached=cached)
    return range(n)


if __name__ == "__main__":
    out = main()
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
