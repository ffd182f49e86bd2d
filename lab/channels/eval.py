"""Judge-free, held-out evaluation of the channels.

Per capability, two versions side by side:
  log-likelihood   which continuation of the counterfactual set the model prefers (selection: the marked
                   item among three, chance 1/3; register: the pole's word vs the opposite pole's, counted per
                   prompt pair as "both poles right", chance 1/4);
  generation       greedy text scored by the published metrics: "dominant" (selection: the marked item is
                   referenced strictly more than each other candidate) and "directional" (register: the
                   +pole response scores higher than the -pole response on a transparent lexicon; VADER
                   compound for affect). Lexicons are returned in the report (tables) and saved beside it.
Each against the same model with the channels zeroed (= removed, see injection.py), paired exact McNemar.
Also: the conflict/override test, the channel-vs-text three-arm experiment with prompt-token costs,
and the native track's held-out loss with channels zeroed against its two bracketing baselines.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from scipy.stats import binomtest

from lab import LabError
from lab.channels.data import DAY_WORDS, NIGHT_WORDS, SELECTION, Item, heldout_items
from lab.corpus import CAUTIOUS, PERMISSIVE, TIMES
from lab.report import Published, Report
from lab.stats import compare_proportions, mcnemar_exact, paired_delta, paired_t, t_mean

SRC = "tinyMARS write-up (PUBLISHED.md)"
PUBLISHED_SELECTION = {"memory": "35% vs 5%", "continuity": "58% vs 29%", "identity": "72% vs 20%"}

# --- transparent lexicons ----------------------------------------------------------------------------
LEXICONS = {
    "time": {
        "+": sorted(set(DAY_WORDS) | {w for k in ("dawn", "morning", "noon") for w in [k, *TIMES[k]]}
                    | {"day", "daylight", "sunny", "sun"}),
        "-": sorted(set(NIGHT_WORDS) | {w for k in ("evening", "night") for w in [k, *TIMES[k]]}
                    | {"midnight", "moon", "dark"}),
    },
    "ethics": {
        "+": sorted(set(CAUTIOUS) | {"careful", "caution", "cautious", "safe", "safely", "permission", "warning",
                                     "check", "risk"}),
        "-": sorted(set(PERMISSIVE) | {"quick", "quickly", "bold", "free", "sure", "fast"}),
    },
}


def lexicon_score(text: str, cap: str) -> float:
    """+pole minus -pole phrase counts (longest phrases first, each span counted once); VADER for affect."""
    if cap == "affect":
        return float(_vader().polarity_scores(text)["compound"])
    if cap not in LEXICONS:
        raise LabError(f"no lexicon for capability {cap!r}")
    t = " " + text.lower() + " "
    score = 0.0
    phrases = sorted(((p, s) for s in ("+", "-") for p in LEXICONS[cap][s]), key=lambda x: -len(x[0]))
    for p, sign in phrases:
        pat = r"(?<![a-z])" + re.escape(p.lower()) + r"(?![a-z])"
        n = len(re.findall(pat, t))
        if n:
            score += n if sign == "+" else -n
            t = re.sub(pat, " ", t)
    return score


_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def dominant(text: str, keys: list[list[str]], label: int) -> bool:
    """The marked candidate is referenced strictly more often than each of the others."""
    t = text.lower()
    counts = [sum(len(re.findall(r"(?<![a-z])" + re.escape(k.lower()) + r"(?![a-z])", t)) for k in ks) for ks in keys]
    return all(counts[label] > c for i, c in enumerate(counts) if i != label)


@contextlib.contextmanager
def threads(n: int | None):
    """Run with n intra-op threads: tiny models gain nothing from more, and on a shared 2-core box
    thread oversubscription made a smoke step ~40x slower."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- the two versions ------------------------------------------------------------------------------

def ll_choices(model, items: Sequence[Item], zero: bool = False, with_text: bool | None = None,
               conflict: bool = False, trained_frame: bool = False) -> np.ndarray:
    """(N, K) log p of each candidate continuation. conflict=True prepends the competing-state text;
    trained_frame=True words the state text in a training frame (see `ChannelModel.prompt_of`)."""
    prompts, conts, states, idx = [], [], [], []
    for i, it in enumerate(items):
        p = model.prompt_of(it, with_text, trained_frame)
        if conflict:
            p = it.conflict_text + p
        for c in it.candidates:
            prompts.append(p)
            conts.append(c)
            states.append(it.state)
            idx.append(i)
    ch = model.channels(states, zero=zero)
    with torch.no_grad():
        lp = model.continuation_logprobs(prompts, conts, ch).numpy()
    K = len(items[0].candidates)
    return lp.reshape(len(items), K)


def ll_correct(model, items, **kw) -> np.ndarray:
    lp = ll_choices(model, items, **kw)
    labels = np.array([it.label for it in items])
    best = lp.argmax(1)
    # a tie (e.g. identical rows when zeroed) is not a success
    top2 = np.sort(lp, 1)[:, -2:]
    return (best == labels) & (top2[:, 1] > top2[:, 0])


def per_unit(items: Sequence[Item], ok) -> np.ndarray:
    """Outcomes per independent unit, in the items' order: a selection item's own; a register prompt pair's
    "both poles right". The two poles of a pair share the prompt and the candidates: with the channels zeroed
    exactly one of them can win, so counting both as items doubles n and makes every p too small."""
    ok = np.asarray(ok, bool)
    if len(items) != len(ok):
        raise LabError(f"{len(ok)} outcomes for {len(items)} items")
    if not len(items) or not items[0].pair:
        return ok
    by_pair: dict[str, list[bool]] = {}
    for it, o in zip(items, ok):
        by_pair.setdefault(it.pair, []).append(bool(o))
    odd = [p for p, v in by_pair.items() if len(v) != 2]
    if odd:
        raise LabError(f"register prompt pairs {odd[:3]} do not have exactly two poles")
    return np.array([all(v) for v in by_pair.values()])


def above_chance(outcomes, chance: float) -> float:
    """One-sided exact binomial p of a success rate above its chance level (a rate below chance is not evidence
    of reading the state). For register pairs it is the informative test: with the channels zeroed both poles
    see one input, so the zeroed rate is 0 by construction."""
    ok = np.asarray(outcomes, bool)
    return float(binomtest(int(ok.sum()), int(ok.size), chance, alternative="greater").pvalue)


def unit_chance(items: Sequence[Item]) -> float:
    """The chance level of `per_unit` outcomes: 1/K per selection item, (1/2)^2 per register pair."""
    if not len(items) or not items[0].pair:
        return float(np.mean([1 / len(it.candidates) for it in items])) if len(items) else float("nan")
    return 0.25


def generations(model, items: Sequence[Item], zero: bool = False, max_new_tokens: int = 8) -> list[str]:
    ch = model.channels([it.state for it in items], zero=zero)
    return model.generate([model.prompt_of(it) for it in items], ch, max_new_tokens)


def gen_success(cap: str, items: Sequence[Item], texts: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """Selection: dominant per item. Register: directional per +/- pair. Returns (successes, rows)."""
    if cap in SELECTION:
        ok = np.array([dominant(t, it.keys, it.label) for it, t in zip(items, texts)])
        return ok, [{"prompt": it.prompt, "marked": it.candidates[it.label].strip(), "response": t, "dominant": bool(o)}
                    for it, t, o in zip(items, texts, ok)]
    by_pair: dict[str, dict[int, str]] = {}
    for it, t in zip(items, texts):
        by_pair.setdefault(it.pair, {})[it.pole] = t
    ok, rows = [], []
    for pair, d in by_pair.items():
        s_plus, s_minus = lexicon_score(d[1], cap), lexicon_score(d[-1], cap)
        ok.append(s_plus > s_minus)
        rows.append({"pair": pair, "plus": d[1], "minus": d[-1], "score_plus": s_plus, "score_minus": s_minus,
                     "directional": s_plus > s_minus})
    return np.array(ok), rows


# --- the report --------------------------------------------------------------------------------------

def evaluate_adapter(model, report: Report, config, text_model=None, log=print) -> dict:
    """Fill `report` with every adapter-track measure; returns raw per-capability outcomes."""
    raw = {}
    gen_examples: dict[str, list] = {}
    arms_rows = []
    for cap in config.capabilities:
        items = heldout_items(cap, config.n_heldout, seed=config.seed)
        n_prompts = len({it.prompt for it in items})
        # log-likelihood version, per independent unit (a register pair succeeds when both its poles do)
        unit = "item" if cap in SELECTION else "prompt pair (both poles)"
        full = per_unit(items, ll_correct(model, items))
        zero = per_unit(items, ll_correct(model, items, zero=True))
        m = compare_proportions(f"{cap}: LL preferred = state's continuation", full, zero, "channels zeroed")
        chance = unit_chance(items)
        m.extra.update(chance=chance, n_prompts=n_prompts, unit=unit, n_items=len(items),
                       p_above_chance=above_chance(full, chance))
        report.add(m)
        # generation version
        texts_on = generations(model, items, max_new_tokens=config.gen_tokens)
        texts_off = generations(model, items, zero=True, max_new_tokens=config.gen_tokens)
        g_on, rows_on = gen_success(cap, items, texts_on)
        g_off, _ = gen_success(cap, items, texts_off)
        metric = "dominant" if cap in SELECTION else "directional"
        gm = compare_proportions(f"{cap}: generation {metric}", g_on, g_off, "channels zeroed")
        gm.extra.update(metric=metric, unit="item" if cap in SELECTION else "prompt pair")
        pub = PUBLISHED_SELECTION.get(cap, "100% vs 0% (ablated degenerate by construction)")
        report.add(gm, Published(f"{cap} {metric}, frozen-base adapter vs channel zeroed, held-out", pub, SRC))
        gen_examples.setdefault("selection" if cap in SELECTION else "register", []).extend(
            {"capability": cap, **r} for r in rows_on[:3])
        # conflict / override: channel says one state, text in the prompt the competing one
        lp_c = ll_choices(model, items, conflict=True)
        lp_z = ll_choices(model, items, zero=True, conflict=True)
        lab = np.array([it.label for it in items])
        opp = np.array([it.conflict_label for it in items])
        r = np.arange(len(items))
        follow = per_unit(items, lp_c[r, lab] > lp_c[r, opp])
        follow_z = per_unit(items, lp_z[r, lab] > lp_z[r, opp])
        cm = compare_proportions(f"{cap}: conflict, follows channel over text", follow, follow_z, "channels zeroed")
        cm.extra.update(unit=unit)
        report.add(cm)  # the published 264/265 is pooled over capabilities: it sits beside the pooled measure below
        # three arms: channel / same state as text (equally trained) / neither
        # the frozen base reading the state as text, untrained (channels zeroed = the bare base)
        text_base = per_unit(items, ll_correct(model, items, zero=True, with_text=True))
        # the channel arm with its selection texts worded as in training: the channel's own unseen-wording control
        # (register channels carry numbers and posture names, one format in both splits)
        seen_items = [replace(it, state=it.state_trained_frame) if it.state_trained_frame else it for it in items]
        full_seen = per_unit(items, ll_correct(model, seen_items)) if cap in SELECTION else full
        row = {"capability": cap, "n": len(full), "unit": unit, "chance": round(chance, 4),
               "channel": float(full.mean()), "p_channel_above_chance": m.extra["p_above_chance"],
               "channel_trained_frames": float(full_seen.mean()), "neither": float(zero.mean()),
               "text_untrained_base": float(text_base.mean()), "tokens_channel": 0.0, "tokens_neither": 0.0}
        if text_model is not None:
            text = per_unit(items, ll_correct(text_model, items))
            # the same text arm with the state worded as in training: what unseen wording costs it
            text_seen = per_unit(items, ll_correct(text_model, items, trained_frame=True))
            tok = text_model.base.tokenizer
            cost = float(np.mean([len(tok.encode(it.text_state, add_special_tokens=False)) for it in items]))
            mc = mcnemar_exact(full, text)
            tm = compare_proportions(f"{cap}: channel arm vs text arm (LL)", full, text, "state as text, equally trained")
            sizes = dict(channel_params=model.adapter.n_params(), text_params=text_model.adapter.n_params(),
                         text_lora_rank=text_model.text_lora.rank)
            tm.extra.update(text_prompt_tokens=cost, channel_prompt_tokens=0, neither=float(zero.mean()), **sizes)
            report.add(tm)
            # like for like: both arms with their state worded in training frames
            row.update(text=float(text.mean()), tokens_text=cost, p_channel_vs_text=mc["p_value"],
                       text_trained_frames=float(text_seen.mean()),
                       p_channel_vs_text_trained_frames=mcnemar_exact(full_seen, text_seen)["p_value"], **sizes)
            tm.extra.update(text_trained_frames=float(text_seen.mean()))
        arms_rows.append(row)
        raw[cap] = dict(ll_full=full, ll_zero=zero, gen_full=g_on, gen_zero=g_off, follow=follow, follow_zero=follow_z)
        log(f"{cap:10s} LL {full.mean():.3f} vs zeroed {zero.mean():.3f} (p={m.p_value:.2g}; "
            f"above chance {chance:.3g}: p={m.extra['p_above_chance']:.2g}); "
            f"gen {metric} {g_on.mean():.3f} vs {g_off.mean():.3f} (p={gm.p_value:.2g}); "
            f"conflict follows channel {follow.mean():.3f} vs {follow_z.mean():.3f}"
            + (f"; text arm {row['text']:.3f} ({row['text_trained_frames']:.3f} in training frames) at "
               f"{row['tokens_text']:.1f} prompt tokens" if text_model else ""))
    for kind, rows in gen_examples.items():
        report.tables[f"generation examples ({kind}, channels on)"] = rows
    report.tables["channel vs text vs neither (LL accuracy, prompt tokens per arm)"] = arms_rows
    report.tables["lexicons"] = [{"capability": c, "pole": s, "phrases": LEXICONS[c][s]} for c in LEXICONS for s in ("+", "-")] + [
        {"capability": "affect", "pole": "+/-", "phrases": ["VADER compound score (vaderSentiment)"]}]
    # pooled over capabilities
    allf = np.concatenate([raw[c]["follow"] for c in raw])
    allz = np.concatenate([raw[c]["follow_zero"] for c in raw])
    report.add(compare_proportions("all capabilities: conflict, follows channel over text", allf, allz, "channels zeroed"),
               Published("conflict (channel vs opposite text): follows the channel", "264/265 = 99.6%", SRC))
    return raw


def native_heldout_windows(model, stream: np.ndarray, seq: int, n_windows: int) -> np.ndarray:
    """Per-window mean next-token loss on fixed held-out windows (no channels)."""
    from lab.corpus import token_windows
    n = min(n_windows, (len(stream) - 1) // seq)
    offs = np.arange(n) * seq
    out = []
    with torch.no_grad():
        for i in range(0, n, 16):
            x = token_windows(stream, offs[i: i + 16], seq)
            logits = model.base.model(input_ids=x[:, :-1]).logits.float()
            l = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
            out += l.tolist()
    return np.array(out)


def evaluate_native(config, text_base, report: Report, runs: Sequence[dict], log=print) -> None:
    """The native track: per training seed (one {model: dir} each, `train.native_run_dirs`), held-out loss of the
    channel model with its channels zeroed against the two channel-less baselines of the same seed (paired over
    held-out windows: evaluation noise only), and whether the channel decides the preferred continuation (McNemar
    over held-out items); then the same questions across seeds (paired t over per-seed values), the test of
    whether *training with channels* makes the difference, since each seed is one independent training run.
    Every seed is scored on the same held-out windows and items. `config` gives the held-out items (the adapter's
    draw); the windows follow the native models' own settings."""
    from lab.corpus import corpus_tokens
    from lab.channels.train import load_native
    from lab.corpus import load_tokenizer

    if not runs:
        raise LabError("evaluate_native needs at least one training seed's native models, got none")
    loaded = [{k: load_native(p, text_base) for k, p in paths.items()} for paths in runs]
    # the windows come from the native models' own corpus settings, which every model of every seed must share
    shared = {(m.config.native_seq, m.config.native_docs, m.config.preset_name) for run in loaded for m in run.values()}
    if len(shared) != 1:
        raise LabError(f"the native models were trained with different (window, documents, preset) settings {sorted(shared)}; "
                       "retrain them together with `lab train channels --force`")
    seq, docs, preset = shared.pop()
    for paths, run in zip(runs, loaded):
        seeds = {k: m.config.seed for k, m in run.items()}
        if len(set(seeds.values())) != 1:
            raise LabError(f"one run's models have different training seeds {seeds} ({paths['channels'].parent})")
    tok = load_tokenizer()
    held = corpus_tokens(tok, "heldout", max(500, docs // 20), seed=4321, guard_docs=docs)
    n_win = 64 if preset == "smoke" else 256
    theirs_loss = Published("native, channels zeroed minus each channel-less baseline, held-out loss",
                            "-0.427 / -0.428 nats (4.825 vs 5.252 / 5.253)", SRC)
    items = {cap: heldout_items(cap, config.n_heldout, seed=config.seed) for cap in config.capabilities}
    one = len(runs) == 1
    per_seed, table = [], []
    for models in loaded:
        seed = models["channels"].config.seed
        losses = {k: native_heldout_windows(m, held, seq, n_win) for k, m in models.items()}
        ch = losses["channels"]
        for b in ("baseline-small", "baseline-large"):
            d = paired_delta(f"native seed {seed}: held-out loss, channels zeroed minus {b} (over windows)", ch, losses[b], b)
            d.extra.update(channels_loss=float(ch.mean()), baseline_loss=float(losses[b].mean()), training_seed=seed,
                           n_params_channels=models["channels"].meta["n_params"], n_params_baseline=models[b].meta["n_params"],
                           unit="held-out window (the same for every seed) of one training run: evaluation noise, "
                                "not the variation between training runs")
            # theirs as the same difference (which of their two baselines is the smaller one is not published)
            report.add(d, theirs_loss if one else None)
        table += [{"seed": seed, "model": k, "n_params": m.meta["n_params"], "heldout_loss": float(losses[k].mean()),
                   "n_windows": len(losses[k])} for k, m in models.items()]
        # does the channel decide the preferred output? held-out counterfactual sets, full vs zeroed
        cm = models["channels"].cm
        full = [per_unit(items[c], ll_correct(cm, items[c])) for c in config.capabilities]
        zero = np.concatenate([per_unit(items[c], ll_correct(cm, items[c], zero=True)) for c in config.capabilities])
        # pooled over selection items (chance 1/3) and register pairs (both poles: 1/4): its chance level is their mix
        chance = float(np.mean(np.concatenate([[unit_chance(items[c])] * len(f) for c, f in zip(config.capabilities, full)])))
        theirs_decides = Published("native: channel decides the preferred output (counterfactual pairs; chance 25% there, "
                                   f"{chance:.1%} here)", "88.8% of 455", SRC)
        full = np.concatenate(full)
        m = compare_proportions(f"native seed {seed}: channel decides the preferred continuation (held-out)", full, zero,
                                "channels zeroed")
        m.extra.update(chance=chance, training_seed=seed)
        report.add(m, theirs_decides if one else None)
        per_seed.append({"seed": seed, **{k: float(v.mean()) for k, v in losses.items()},
                         "decides": float(full.mean()), "decides_zeroed": float(zero.mean()), "n_units": len(full)})
        log(f"native seed {seed}: held-out loss channels-zeroed {ch.mean():.4f} vs {losses['baseline-small'].mean():.4f} / "
            f"{losses['baseline-large'].mean():.4f}; channel decides {full.mean():.3f} vs zeroed {zero.mean():.3f} (n={len(full)})")
    report.tables["native models"] = table
    seeds = [r["seed"] for r in per_seed]
    if one:
        report.notes.append(f"Native track: one training seed ({seeds[0]}); its p-values cover held-out windows and items, "
                            "not the variation between training runs (set native_seeds for that).")
        return
    col = lambda k: np.array([r[k] for r in per_seed])  # noqa: E731
    unit = "training seed (each its own initialisation and data order, shared by its three models)"
    for b in ("baseline-small", "baseline-large"):
        d = paired_t(f"native: held-out loss, channels zeroed minus {b}, across {len(runs)} training seeds",
                     col("channels"), col(b), b)
        d.extra.update(seeds=seeds, per_seed=(col("channels") - col(b)).round(5).tolist(), unit=unit)
        report.add(d, theirs_loss)
    rate = t_mean(f"native: channel decides the preferred continuation (rate), across {len(runs)} training seeds",
                  col("decides"), chance, "chance")
    rate.extra.update(seeds=seeds, per_seed=col("decides").tolist(), unit=unit)
    report.add(rate, theirs_decides)
    gain = paired_t(f"native: channel decides, full minus zeroed rate, across {len(runs)} training seeds",
                    col("decides"), col("decides_zeroed"), "channels zeroed")
    gain.extra.update(seeds=seeds, per_seed=(col("decides") - col("decides_zeroed")).round(5).tolist(), unit=unit)
    report.add(gain)
