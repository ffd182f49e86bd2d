"""Channels: injection overhead vs the base forward, side by side, and the app's non-generative latency.

    python bench/bench_channels.py

Measures (interleaved repetitions in a shuffled order, medians, ratios with a paired bootstrap CI over reps; one intra-op thread so the shared cores do not oversubscribe):
  lab_uses              the target (issue #4: injection overhead <= 5% of the base forward), measured where the lab
                        injects channels, each lab call with channels against the same call without: the eval's
                        scoring pass (64 rows per forward) and generation (64 prompts x 8 tokens), the app's
                        generation (1 prompt x 12 tokens); and the app's log-prob shift (6 words, one forward), the
                        one use that opens a context for a single small forward (see `lab_uses`)
  forward_ms            the bare base forward (B x T tokens)
  additive_ms / ratio   one `inject` context of all six channels into every layer, around one forward
  xattn_ms / ratio      the multi-token cross-attention variant (per-position attention: costs more)
  app_p95_ms            the app page's non-generative recompute: encode the six channels, log-prob shift of
                        six words (with / zeroed), alpha heatmap figure; target <= 150 ms p95
  additive_by_shape     the additive injection at three input shapes: one 32-token prompt (the app, generation),
                        8 x 64 and 32 x 64 (the adapter's training batch of 32 items), two ways:
                        per forward   one state over 8 forwards in one context vs 8 bare forwards (the
                                      channels config's 8 generated tokens: one context per generation)
                        one-shot      a context around a single forward
                        The injection costs a fixed amount per context (check the channel values, project
                        them into every layer's delta, activate the hooks: 0.3-0.75 ms on tiny-gpt2 by machine,
                        ~8 ms on the GPT-2-124M shape, whose projection is 85 MB) plus one add per layer and
                        forward. The fixed part is per channel state, not per forward: it is in the one-shot
                        ratio, and an eighth of it in the per-forward ratio. On a 4-ms forward it is over 10%.
Uses tiny-gpt2 when it is on disk, else smoke-gpt2 (trained in seconds if missing).

    python bench/bench_channels.py --lr-sweep --arm=channel --lrs=1e-2,3e-2,6e-2,0.12 [--base=tiny-mamba2] [--mode=xattn]

trains one arm (channel: the injector's gates, or with --mode=xattn the cross-attention injector; text: the text
arm's LoRA) of the tiny preset once per learning rate, full length, one run at a time, and prints the mean
validation loss of the last four evaluations. Validation is its own split (`lab.channels.data.validation_items`:
training templates and entities, its own draws), so no rate is picked on the held-out pools the report tests.

    python bench/bench_channels.py --aim [--preset=quick] [--out=DIR]
    python bench/bench_channels.py --report=DIR/report.json [--preset=tiny]    # the same, read from a saved report

runs the channels pipeline (`lab.channels.run`) on a preset and prints the aim of issue #28 against it: each of the
six capabilities significant (p < .05, in the channel's direction) on held-out items, in log-likelihood and in
generation (whole response), with tests that can fail; and the native model's held-out target loss below its
width-matched channel-less baseline across training seeds (the native track runs in the tiny preset, not quick).

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
    from lab.bases import preset_path
    from lab.channels import Config
    return Config.preset("tiny" if (preset_path("tiny-gpt2") / "config.json").exists() else "smoke").load_base()


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


def shape_sweep(base, model, state, shapes=((1, 32, 150), (8, 64, 60), (32, 64, 40)), n_forwards: int = 8) -> list[dict]:
    """Additive-injection overhead at several (batch, tokens) shapes, all arms of a shape interleaved:

    one_shot      one `inject` context around one forward: the fixed per-context setup (check the channel
                  values, project them into every layer's delta, activate four hooks) plus the per-forward adds
    per_forward   one state over `n_forwards` forwards in one context (a generation's or a scoring pass's
                  worth), divided by as many bare forwards: the overhead on the forward itself, with the
                  setup amortised over those forwards
    """
    from lab.channels.injection import inject
    from lab.stats import paired_ratio

    rows = []
    g = torch.Generator().manual_seed(1)
    for batch, seq, reps in shapes:
        ids = torch.randint(10, len(base.tokenizer) - 10, (batch, seq), generator=g)
        chans = model.channels([state] * batch)

        def bare(n):
            def f():
                with torch.no_grad():
                    for _ in range(n):
                        base.model(input_ids=ids)
            return f

        def additive(n):
            def f():
                with torch.no_grad(), inject(base, model.injector, chans, batch=batch):
                    for _ in range(n):
                        base.model(input_ids=ids)
            return f

        n = n_forwards
        t = _interleaved({"forward": bare(1), "additive": additive(1),
                          f"forward x{n}": bare(n), f"additive x{n}": additive(n)}, reps)
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        one, one_lo, one_hi = paired_ratio(t["additive"], t["forward"])
        per, per_lo, per_hi = paired_ratio(t[f"additive x{n}"], t[f"forward x{n}"])
        rows.append({"batch": batch, "seq": seq, "reps": reps, "forward_ms": round(med["forward"], 3),
                     "one_shot_ratio": round(one, 4), "one_shot_ci95": [round(one_lo, 4), round(one_hi, 4)],
                     "one_shot_added_ms": round(med["additive"] - med["forward"], 3),
                     "per_forward_ratio": round(per, 4), "per_forward_ci95": [round(per_lo, 4), round(per_hi, 4)],
                     "per_forward_added_ms": round((med[f"additive x{n}"] - med[f"forward x{n}"]) / n, 3),
                     "n_forwards": n})
    return rows


def _forwards_run(base, fn) -> int:
    """How many forwards of the base `fn` runs (a counting torch pre-hook, used outside the timed reps)."""
    n = [0]

    def count(*_):
        n[0] += 1
    handle = base.model.register_forward_pre_hook(count)
    try:
        fn()
    finally:
        handle.remove()
    return n[0]


def lab_uses(base, model, reps: float = 1.0) -> list[dict]:
    """The additive injection where the lab itself uses it, each against the same call with no channels
    (`channels=None`: no context is opened, everything else is the same code), on held-out items with
    their own channel states (encoded once, outside the timing: encoding is not injection):

    scoring      the eval's log-likelihood pass: 64 (prompt, candidate) rows per forward, one context each
    generation   the eval's: 64 prompts, 8 greedy tokens, one context per generation
    app_generate the app page's side-by-side generation: one prompt, 12 tokens
    app_shift    the app page's log-prob shift: six words scored in one forward, one context: a single small
                 forward per state, where the fixed per-context cost shows most
    `reps` scales every use's repetition count."""
    from lab.channels.data import heldout_items
    from lab.stats import paired_ratio

    memory = heldout_items("memory", 22)  # three candidates each: 66 rows, the eval's batch is 64
    rows = [(model.prompt_of(it), c, it.state) for it in memory for c in it.candidates][:64]
    prompts, conts, states = map(list, zip(*rows))
    score_ch = model.channels(states)
    gen_items = heldout_items("continuity", 64)
    gen_prompts = [model.prompt_of(it) for it in gen_items]
    gen_ch = model.channels([it.state for it in gen_items])
    it = heldout_items("identity", 1)[0]
    one, one_ch = [model.prompt_of(it)], model.channels([it.state])
    words = [" joyful", " gloomy", " morning", " night", " carefully", " gladly"]
    shift_ch = model.channels([it.state] * len(words))

    uses = {
        "scoring": ("the eval's log-likelihood pass, 64 rows per forward", 60,
                    lambda ch: model.continuation_logprobs(prompts, conts, ch)),
        "generation": ("the eval's generation, 64 prompts x 8 tokens", 24,
                       lambda ch: model.generate(gen_prompts, ch, 8, early_exit=False)),
        "app_generate": ("the app's generation, 1 prompt x 12 tokens", 250,
                         lambda ch: model.generate(one, ch, 12, early_exit=False)),
        "app_shift": ("the app's log-prob shift, 6 words in one forward", 300,
                      lambda ch: model.continuation_logprobs(one * len(words), words, ch)),
    }
    chans = {"scoring": score_ch, "generation": gen_ch, "app_generate": one_ch, "app_shift": shift_ch}
    out = []
    for key, (what, n, call) in uses.items():
        if _forwards_run(base, lambda: call(chans[key])) != _forwards_run(base, lambda: call(None)):
            raise RuntimeError(f"{key}: the two arms ran different numbers of forwards")
        with torch.no_grad():
            t = _interleaved({"bare": lambda: call(None), "channels": lambda: call(chans[key])}, max(2, round(n * reps)))
        r, lo, hi = paired_ratio(t["channels"], t["bare"])
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        out.append({"use": key, "what": what, "reps": len(t["bare"]), "forwards": _forwards_run(base, lambda: call(None)),
                    "bare_ms": round(med["bare"], 3), "ratio": round(r, 4), "ci95": [round(lo, 4), round(hi, 4)],
                    "added_ms": round(med["channels"] - med["bare"], 3)})
    return out


def main(batch: int = 8, seq: int = 64, reps: int = 150, base=None, sweep: bool = True, uses: bool = True,
         sweep_shapes=((1, 32, 150), (8, 64, 60), (32, 64, 40))) -> dict:
    from lab.channels import Config, build
    from lab.channels.encoders import ChannelState
    from lab.channels.injection import inject
    from lab.channels.probes import alpha_heatmap, logprob_shift
    from lab.stats import paired_ratio

    torch.set_num_threads(1)
    base = base or _base()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(base.tokenizer) - 10, (batch, seq), generator=g)
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

    fns = {"forward": bare, "additive": with_channels("additive"), "xattn": with_channels("xattn")}
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
        "additive_ratio_min": round(min(times["additive"]) / min(times["forward"]), 4),
        "app_p95_ms": round(p95, 1), "app_median_ms": round(statistics.median(app) * 1e3, 1),
        "targets": {"additive injection vs the same lab call without channels, each of lab_uses (issue #4)": "<= 1.05",
                    "app_p95_ms": "<= 150"},
    }
    if uses:
        out["lab_uses"] = lab_uses(base, models["additive"])
    if sweep:
        out["additive_by_shape"] = shape_sweep(base, models["additive"], state, sweep_shapes)
    return out


def _print(r: dict) -> None:
    print(f"base {r['base']}, batch {r['batch']} x {r['seq']} tokens, {r['reps']} interleaved reps (medians)")
    print(f"  base forward              {r['forward_ms']:8.2f} ms   1.000")
    lo, hi = r["additive_ratio_ci95"]
    print(f"  + channels (additive)     {r['additive_ms']:8.2f} ms   {r['additive_ratio']:.3f}   "
          f"[{lo:.3f}, {hi:.3f}] paired-bootstrap 95% CI over reps (one context per forward)")
    print(f"  + channels (xattn, K=4)   {r['xattn_ms']:8.2f} ms   {r['xattn_ratio']:.3f}")
    print(f"  additive, ratio of fastest runs {r['additive_ratio_min']:.3f}")
    print(f"  app non-generative recompute: p95 {r['app_p95_ms']:.1f} ms, median {r['app_median_ms']:.1f} ms (target <= 150)")
    uses = r.get("lab_uses", [])
    if uses:
        print("  additive, where the lab uses it, vs the same call without channels (target <= 1.05):")
        for u in uses:
            lo, hi = u["ci95"]
            print(f"    {u['use']:<13} {u['what']:<52} {u['forwards']:>2} forward(s) {u['bare_ms']:8.2f} ms: "
                  f"{u['ratio']:.3f} [{lo:.3f}, {hi:.3f}] (+{u['added_ms']:.2f} ms), {u['reps']} reps")
    rows = r.get("additive_by_shape", [])
    if rows:
        n = rows[0]["n_forwards"]
        print(f"  additive by input shape (target <= 1.05); per forward = one state over {n} forwards in one context:")
        for row in rows:
            (a, b), (c, d) = row["per_forward_ci95"], row["one_shot_ci95"]
            print(f"    {row['batch']:>2} x {row['seq']:<3} tokens, forward {row['forward_ms']:6.2f} ms: per forward "
                  f"{row['per_forward_ratio']:.3f} [{a:.3f}, {b:.3f}] (+{row['per_forward_added_ms']:.2f} ms); "
                  f"one context per forward {row['one_shot_ratio']:.3f} [{c:.3f}, {d:.3f}] (+{row['one_shot_added_ms']:.2f} ms)")


def lr_sweep(arm: str, lrs: list[float], base_name: str = "tiny-gpt2", preset: str = "tiny",
             mode: str = "additive") -> dict[float, float]:
    """Mean validation loss (the validation split: training templates and entities, its own draws) of the last four
    evaluations per learning rate, one full-length run of `arm` each."""
    import tempfile
    from pathlib import Path

    from lab.bases import load_base
    from lab.channels import Config
    from lab.channels.train import train

    if arm not in ("channel", "text"):
        raise SystemExit(f"--arm must be 'channel' or 'text', got {arm!r}")
    base, out = load_base(base_name), {}
    for lr in lrs:
        knob = "text_lr" if arm == "text" else ("xattn_lr" if mode == "xattn" else "lr")
        cfg = Config.preset(preset, base=base_name, mode=mode, **{knob: lr})
        with tempfile.TemporaryDirectory() as tmp:
            art = train(cfg, base, out_dir=Path(tmp) / arm, arm=arm)
        curve = [r["val_loss"] for r in art.manifest["metrics"]["history"] if "val_loss" in r]
        out[lr] = sum(curve[-4:]) / len(curve[-4:])
        print(f"{arm} lr {lr:g}: mean validation loss of the last 4 evaluations {out[lr]:.3f} "
              f"(curve {[round(v, 3) for v in curve]})", flush=True)
    return out


def _passes(m, larger: bool = True) -> bool:
    """Significant at .05 and in the channel's direction (above its control; below it for a loss difference)."""
    import math
    if m.p_value is None or not math.isfinite(m.value) or m.p_value >= 0.05:
        return False
    return m.value > m.control_value if larger else m.value < 0


def aim(preset: str = "quick", out: str | None = None) -> dict:
    """The aim of issue #28, measured on `preset`: per capability, the log-likelihood and generation (whole
    response) tests, and the native track's held-out target loss against the width-matched baseline. `out`:
    also save the whole report there (report.md, report.json, figures as PNG)."""
    import time

    from lab.channels import Config, run

    t0 = time.perf_counter()
    rep = run(Config.preset(preset), attribution=False, progress=False)
    if out:
        rep.save(out, formats=("png",))
    return aim_of_report(rep, preset, round(time.perf_counter() - t0))


def aim_of_report(rep, preset: str, seconds: float | None = None) -> dict:
    """The aim read from a channels report: the first adapter seed's per-item tests and, when the report has
    several adapter seeds, the same two tests across seeds (the test a claim about training needs)."""
    import re

    from lab.channels.data import CAPABILITIES, SELECTION

    names = {m.name: m for m in rep.measures}
    seeds = next((int(g.group(1)) for n in names if (g := re.search(r"across (\d+) adapter seeds$", n))), None)
    rows = []
    for cap in CAPABILITIES:
        sel = cap in SELECTION
        ll = names[f"{cap}: LL picks the marked item" if sel else f"{cap}: LL directional (held-out pole words)"]
        gen = names[f"{cap}: generation dominant (whole response)" if sel
                    else f"{cap}: generation directional (whole response)"]
        row = {"capability": cap, "ll": ll, "gen": gen, "passes": _passes(ll) and _passes(gen)}
        if seeds:
            tail = f", across {seeds} adapter seeds"
            row["ll_seeds"] = names[(f"{cap}: LL picks the marked item" if sel else f"{cap}: LL directional share") + tail]
            row["gen_seeds"] = names[(f"{cap}: generation dominant (whole response)" if sel
                                      else f"{cap}: generation directional share (whole response)") + tail]
            row["passes_seeds"] = _passes(row["ll_seeds"]) and _passes(row["gen_seeds"])
        rows.append(row)
    out = {"preset": preset, "seconds": seconds, "capabilities": rows, "all_six": all(r["passes"] for r in rows),
           "adapter_seeds": seeds}
    if seeds:
        out["all_six_seeds"] = all(r["passes_seeds"] for r in rows)
    key = next((n for n in names if n.startswith("native: held-out target loss, channels on minus baseline-width")), None)
    if key:
        out["native_on_vs_width"] = names[key]
        out["native_zeroed_vs_width"] = names[key.replace("channels on", "channels zeroed")]
        out["native_passes"] = _passes(names[key], larger=False)
    return out


def _print_aim(r: dict) -> None:
    took = f" ({r['seconds']} s)" if r["seconds"] is not None else ""
    print(f"aim of issue #28 on the {r['preset']} preset{took}")

    def line(cap: str, ll, gen, ok: bool) -> str:
        def p(m) -> str:
            return f"{m.p_value if m.p_value is not None else float('nan'):.3g}"
        return (f"  {cap:<10} LL {ll.value_text()} vs {ll.control} {ll.control_value:.3g} (n={ll.n}, p={p(ll)}); "
                f"generation {gen.value_text()} vs {gen.control_value:.3g} (n={gen.n}, p={p(gen)}): "
                f"{'PASS' if ok else 'no'}")

    for row in r["capabilities"]:
        print(line(row["capability"], row["ll"], row["gen"], row["passes"]))
    print(f"  all six significant: {r['all_six']}")
    if r["adapter_seeds"]:
        print(f"  across {r['adapter_seeds']} adapter seeds:")
        for row in r["capabilities"]:
            print(line(row["capability"], row["ll_seeds"], row["gen_seeds"], row["passes_seeds"]))
        print(f"  all six significant across adapter seeds: {r['all_six_seeds']}")
    if "native_on_vs_width" in r:
        for k in ("native_on_vs_width", "native_zeroed_vs_width"):
            m = r[k]
            print(f"  {m.name}: {m.value_text(4, signed=True)} (n={m.n}, p={m.p_value:.3g})")
        print(f"  native below the width-matched baseline across seeds: {r['native_passes']}")
    else:
        print("  native track: not in this preset (it runs in the tiny preset)")


if __name__ == "__main__":
    import sys
    import tempfile

    def _opt(name: str, default: str) -> str:
        return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default)

    if "--lr-sweep" in sys.argv:
        lr_sweep(_opt("arm", "channel"), [float(x) for x in _opt("lrs", "1e-2,3e-2,6e-2,0.12").split(",")],
                 _opt("base", "tiny-gpt2"), mode=_opt("mode", "additive"))
        sys.exit(0)
    if _opt("report", ""):
        from pathlib import Path

        from lab.report import Report
        from lab.store import read_json
        _print_aim(aim_of_report(Report.from_dict(read_json(Path(_opt("report", "")))), _opt("preset", "tiny")))
        sys.exit(0)
    if "--aim" in sys.argv:
        _print_aim(aim(_opt("preset", "quick"), _opt("out", "") or None))
        sys.exit(0)
    _print(main())
    if "--gpt2-small-shape" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            # and one 32-token prompt, the shape where a 4-layer d-128 base shows the fixed per-context cost most
            r = main(reps=20, base=gpt2_small_shape(tmp), uses=False, sweep_shapes=((1, 32, 60),))
            _print({**r, "base": "random-init GPT-2-124M shape (d 768, 12 layers)"})
