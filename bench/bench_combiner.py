"""What the combiner's evaluation costs: wall time and forwards per scored token of each evaluator,
measured side by side in one process on the same held-out tokens.

  sliding window (base)          one forward of `window` tokens per `stride` scored tokens
  naive per-token recompute      one forward per scored token (the reference the sliding window is checked against)
  chunked last-position, base    one forward of `chunk` tokens per scored token
  chunked + k thoughts           1 + k forwards per scored token; cached (KV cache continued) vs full recompute
  combiner head                  the mix + head on cached (h, T) features, per scored token

Run:  python bench/bench_combiner.py     (LAB_BENCH_BASE picks the base; default tiny-gpt2, else smoke-gpt2)

`--sweep [--preset quick]`: the cross-entropy fit's lr, steps and weight decay chosen on the cached
validation split (k=1, the config's feed, the first fit seed's split); prints the validation nats of every grid
point, then the held-out chunked delta bpb at the validation-best point and at the published recipe, each over
the config's fit seeds (each on its own sample of training windows when `feature_samples` is "per_seed", as the
pipeline fits them; mean, t interval, one-sample t p against 0). The aim: a fitted combiner whose delta bpb
is below zero with its interval, on held-out text.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch

from lab import LabError
from lab.bases import load_base
from lab.combiner import bpb as B
from lab.combiner.config import PUBLISHED_CE, Config
from lab.combiner.evaluate import eval_features
from lab.combiner.features import as_tensors, split
from lab.combiner.fit import fit_ce
from lab.combiner.model import Combiner
from lab.combiner.thinking import think
from lab.combiner.train import seed_features
from lab.corpus import heldout_text
from lab.pretrain import ensure_base
from lab.stats import t_mean

SWEEP = {"ce_lr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "ce_steps": (20, 80, 400), "ce_weight_decay": (0.0, 0.01, 0.1)}


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


def sweep(preset: str = "quick", grid: dict | None = None) -> dict:
    """Validation-chosen CE recipe, and the held-out delta bpb at it and at the published recipe."""
    torch.set_num_threads(1)
    cfg = Config.preset(preset)
    base = cfg.load_base()
    ds = seed_features(cfg, base, 0, cfg.k_max, cfg.feed, cfg.feed_scale, progress=False)  # the first fit seed's
    grid = grid or SWEEP
    tr, va = split(as_tensors(ds, 1), cfg.val_fraction, cfg.fit_seeds[0])
    rows = []
    for lr, steps, wd in itertools.product(grid["ce_lr"], grid["ce_steps"], grid["ce_weight_decay"]):
        _, info = fit_ce(base, tr, va, steps, cfg.ce_batch, lr, wd, cfg.fit_seeds[0], desc="sweep")
        rows.append({"ce_lr": lr, "ce_steps": steps, "ce_weight_decay": wd, "val_nats": info["val_nats"],
                     "val_nats_base": info["val_nats_base"]})
        print(f"lr {lr:g}  steps {steps}  wd {wd:g}  val nats {info['val_nats']:.5f}  (base {info['val_nats_base']:.5f})",
              flush=True)
    best = min(rows, key=lambda r: r["val_nats"])
    _, _, feats = eval_features(cfg, base)
    base_nats = B.score_chunks(base, feats)
    nbytes = float(np.sum(feats.nbytes))
    out = {"preset": preset, "base": base.name, "feed": cfg.feed, "n_features": len(ds), "heldout_positions": len(feats),
           "grid_points": len(rows), **{f"best_{k}": best[k] for k in ("ce_lr", "ce_steps", "ce_weight_decay")},
           "best_val_nats": best["val_nats"], "val_nats_base": best["val_nats_base"],
           # the fit starts at the identity (the base's own prediction): a best point above it means no recipe
           # on the grid improves on not fitting at all
           "best_beats_identity_start": best["val_nats"] < best["val_nats_base"]}
    recipes = {"validation_best": {k: best[k] for k in ("ce_lr", "ce_steps", "ce_weight_decay")}, "published": PUBLISHED_CE}
    # the held-out comparison fits each seed on the features the pipeline gives it (cached on disk after the first)
    for name, r in recipes.items():
        per = []
        for i, seed in enumerate(cfg.fit_seeds):
            ds_i = seed_features(cfg, base, i, cfg.k_max, cfg.feed, cfg.feed_scale, progress=False)
            tr_s, va_s = split(as_tensors(ds_i, 1), cfg.val_fraction, seed)
            comb, _ = fit_ce(base, tr_s, va_s, r["ce_steps"], cfg.ce_batch, r["ce_lr"], r["ce_weight_decay"], seed,
                             desc=f"{name} seed {seed}")
            per.append(float((B.score_chunks(base, feats, comb, 1) - base_nats).sum() / B.LN2 / nbytes))
        m = t_mean(f"held-out delta bpb, ce k=1, {name} recipe", per, null=0.0, null_name="0")
        out[f"{name}_delta_bpb"] = m.value
        out[f"{name}_ci_low"], out[f"{name}_ci_high"], out[f"{name}_p_vs_0"] = m.ci_low, m.ci_high, m.p_value
        out[f"{name}_per_seed"] = ", ".join(f"{v:+.5f}" for v in per)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="choose the CE recipe on the validation split")
    ap.add_argument("--preset", default="quick", help="the combiner preset the sweep fits (default quick)")
    args = ap.parse_args()
    out = sweep(args.preset) if args.sweep else main()
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
