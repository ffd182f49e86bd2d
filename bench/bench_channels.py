"""Channels: injection overhead vs the base forward, side by side, and the app's non-generative latency.

    python bench/bench_channels.py

Measures (interleaved repetitions in a shuffled order, medians, ratios with a paired bootstrap CI over reps; one intra-op thread so the shared cores do not oversubscribe):
  forward_ms            the bare base forward (B x T tokens)
  additive_ms / ratio   with all six channels injected into every layer (gated projection); target <= 1.05
  xattn_ms / ratio      the multi-token cross-attention variant (per-position attention: costs more)
  app_p95_ms            the app page's non-generative recompute: encode the six channels, log-prob shift of
                        six words (with / zeroed), alpha heatmap figure; target <= 150 ms p95
  sweep                 the additive ratio at three input shapes: one 32-token prompt (the app, generation),
                        8 x 64 (the headline row) and 32 x 64 (the adapter's training batch of 32 items). The
                        injection costs a fixed amount per context (checks, one matmul for every layer's delta,
                        registering the hooks) plus one add per layer and forward, so its share of the forward
                        falls as the forward grows.
Uses tiny-gpt2 when it is on disk, else smoke-gpt2 (trained in seconds if missing).

    python bench/bench_channels.py --gpt2-small-shape

also measures the same on a randomly initialised GPT-2-124M-shaped model (d 768, 12 layers, the lab's
vocabulary; built offline): the hooks' fixed per-layer cost is a larger share of a 4-layer d-128 forward
than of a real base's.
"""

from __future__ import annotations

import random
import statistics
import time

import torch


def _base():
    from lab.bases import load_base, preset_path
    name = "tiny-gpt2" if (preset_path("tiny-gpt2") / "config.json").exists() else "smoke-gpt2"
    return load_base(name, train_if_missing=name.startswith("smoke"))


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def gpt2_small_shape(directory) -> object:
    """A random-init GPT-2-124M-shaped base in `directory` (saved with save_pretrained, loaded by load_base)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lab.bases import load_base
    from lab.corpus import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return load_base(directory)


def _interleaved(fns: dict, reps: int, seed: int = 0) -> dict:
    """{name: [seconds per rep]}: every arm once per rep, in a fresh random order each rep (what ran just
    before shifts a 13-ms forward by ~1%, so no arm may always follow the same one)."""
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            times[k] += _time(fns[k], 1)
    return times


def shape_sweep(base, model, state, shapes=((1, 32), (8, 64), (32, 64)), reps: int = 60) -> list[dict]:
    """Additive-injection overhead at several (batch, tokens) shapes, each arm pair interleaved."""
    from lab.channels.injection import inject
    from lab.stats import paired_ratio

    rows = []
    g = torch.Generator().manual_seed(1)
    for batch, seq in shapes:
        ids = torch.randint(10, len(base.tokenizer) - 10, (batch, seq), generator=g)
        chans = model.channels([state] * batch)

        def bare():
            with torch.no_grad():
                base.model(input_ids=ids)

        def additive():
            with torch.no_grad(), inject(base, model.injector, chans, batch=batch):
                base.model(input_ids=ids)

        t = _interleaved({"forward": bare, "additive": additive}, reps)
        ratio, lo, hi = paired_ratio(t["additive"], t["forward"])
        fwd = statistics.median(t["forward"]) * 1e3
        rows.append({"batch": batch, "seq": seq, "forward_ms": round(fwd, 3), "ratio": round(ratio, 4),
                     "ci95": [round(lo, 4), round(hi, 4)],
                     "added_ms": round(statistics.median(t["additive"]) * 1e3 - fwd, 3)})
    return rows


def main(batch: int = 8, seq: int = 64, reps: int = 150, base=None, sweep: bool = True) -> dict:
    from lab.channels import Config, build
    from lab.channels.encoders import ChannelState
    from lab.channels.injection import inject
    from lab.channels.probes import alpha_heatmap, logprob_shift
    from lab.stats import paired_ratio

    torch.set_num_threads(1)
    base = base or _base()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(base.tokenizer) - 10, (batch, seq), generator=g)
    cfg = Config.preset("tiny", base=base.name)
    models = {m: build(Config.preset("tiny", base=base.name, mode=m), base) for m in ("additive", "xattn")}
    for m in models.values():
        with torch.no_grad():
            m.injector.alpha.normal_(0, 0.1, generator=g)  # open gates: measure real work, not zeros
    state = ChannelState(memory="the walnut", affect=(0.5, 0.2), time=(8, "Monday"), ethics="cautious",
                         identity="I am Mara, a baker.", continuity="We were just talking about the harbor.")
    chans = {k: m.channels([state] * batch) for k, m in models.items()}

    def bare():
        with torch.no_grad():
            base.model(input_ids=ids)

    def with_channels(kind):
        def f():
            with torch.no_grad(), inject(base, models[kind].injector, chans[kind], batch=batch):
                base.model(input_ids=ids)
        return f

    def steady(kind, n=4):
        # one context, n forwards (as in generation or scoring): the hooks' steady-state cost
        def f():
            with torch.no_grad(), inject(base, models[kind].injector, chans[kind], batch=batch):
                for _ in range(n):
                    base.model(input_ids=ids)
        return f

    def bare4():
        with torch.no_grad():
            for _ in range(4):
                base.model(input_ids=ids)

    fns = {"forward": bare, "additive": with_channels("additive"), "xattn": with_channels("xattn"),
           "forward x4": bare4, "additive x4": steady("additive")}
    times = _interleaved(fns, reps)  # interleaved, so drifting load hits every arm alike
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    words = ["joyful", "gloomy", "morning", "night", "carefully", "gladly"]
    model = models["additive"]

    def app_recompute():
        model.channels([state])
        logprob_shift(model, "On Tuesday, Mara the baker felt", state, words)
        alpha_heatmap(model.injector.alpha, model.injector.names)

    app_recompute()
    app = sorted(_time(app_recompute, 40))
    p95 = app[int(0.95 * (len(app) - 1))] * 1e3
    out = {
        "base": base.name, "batch": batch, "seq": seq, "reps": reps,
        "forward_ms": round(med["forward"], 3),
        "additive_ms": round(med["additive"], 3), "additive_ratio": round(med["additive"] / med["forward"], 4),
        "additive_ratio_ci95": [round(v, 4) for v in paired_ratio(times["additive"], times["forward"])[1:]],
        "xattn_ms": round(med["xattn"], 3), "xattn_ratio": round(med["xattn"] / med["forward"], 4),
        "additive_steady_ratio": round(med["additive x4"] / med["forward x4"], 4),
        "additive_ratio_min": round(min(times["additive"]) / min(times["forward"]), 4),
        "app_p95_ms": round(p95, 1), "app_median_ms": round(statistics.median(app) * 1e3, 1),
        "targets": {"additive_ratio": "<= 1.05", "app_p95_ms": "<= 150"},
    }
    if sweep:
        out["additive_by_shape"] = shape_sweep(base, models["additive"], state)
    return out


def _print(r: dict) -> None:
    print(f"base {r['base']}, batch {r['batch']} x {r['seq']} tokens, {r['reps']} interleaved reps (medians)")
    print(f"  base forward              {r['forward_ms']:8.2f} ms   1.000")
    lo, hi = r["additive_ratio_ci95"]
    print(f"  + channels (additive)     {r['additive_ms']:8.2f} ms   {r['additive_ratio']:.3f}   "
          f"[{lo:.3f}, {hi:.3f}] paired-bootstrap 95% CI over reps (target <= 1.05)")
    print(f"  + channels (xattn, K=4)   {r['xattn_ms']:8.2f} ms   {r['xattn_ratio']:.3f}")
    print(f"  additive, ratio of fastest runs {r['additive_ratio_min']:.3f}; one context over 4 forwards "
          f"(generation/scoring) {r['additive_steady_ratio']:.3f}")
    print(f"  app non-generative recompute: p95 {r['app_p95_ms']:.1f} ms, median {r['app_median_ms']:.1f} ms (target <= 150)")
    for row in r.get("additive_by_shape", []):
        lo, hi = row["ci95"]
        print(f"  additive at {row['batch']:>2} x {row['seq']:<3} tokens: forward {row['forward_ms']:7.2f} ms, "
              f"ratio {row['ratio']:.3f} [{lo:.3f}, {hi:.3f}], +{row['added_ms']:.2f} ms")


if __name__ == "__main__":
    import sys
    import tempfile

    _print(main())
    if "--gpt2-small-shape" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            r = main(reps=20, base=gpt2_small_shape(tmp), sweep=False)
            _print({**r, "base": "random-init GPT-2-124M shape (d 768, 12 layers)"})
