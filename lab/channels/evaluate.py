"""Judge-free, held-out evaluation of the channels, and `run`: the whole pipeline.

    report = run(Config.preset("smoke"))          # train what is missing, evaluate, probe: one Report
    report = evaluate(train_or_load(config, base), text_artifact=..., native_runs=...)

Every reported test can come out either way (tests/test_channels.py feeds each one synthetic inputs both ways):
  selection (memory, continuity, identity), per held-out item:
    log-likelihood   the marked item's continuation preferred among three (chance 1/3), against the same model with
                     the channels zeroed (exact McNemar) and against chance (exact binomial);
    generation       "dominant": the marked item referenced strictly more than each other candidate, scored on the
                     response's first clause and on the whole response, against the channels zeroed (McNemar).
  register (affect, time, ethics), per held-out prompt pair (the same prompt at the two channel poles):
    log-likelihood   "directional": the +pole's margin (log p of its word minus the other's) above the -pole's; a sign
                     test of directional against anti-directional pairs, and a pole-label permutation null (swapping
                     the poles within pairs: a sign flip of the margin differences); beside it the same with words of
                     the training half of the pole pools (the diagnostic: reading the state vs generalising to unseen
                     words), and "both poles right" against its chance 1/4;
    generation       "directional" on a transparent lexicon (VADER for affect), first clause and whole response: the
                     same sign test and permutation null. (With the channels zeroed both poles produce one text, so a
                     comparison with the zeroed arm is decided by construction and is not reported.)
  conflict: the channel states one thing, a text prefix the competing one. Per unit, +1 when the output follows the
    channel, -1 when it follows the text: the follow-the-channel share against 50% (sign test), and against the arm
    where the text agrees with the channel (McNemar), in log-likelihood and in generation.
Also: the channel-vs-text three-arm experiment with prompt-token costs, the other injection modes and adapter seeds
(across-seed t tests), and the native track (held-out target loss, channels on and zeroed, against a width-matched
and two parameter-bracketing channel-less baselines, across seeds).
"""

from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from lab import LabError
from lab.bases import PRESETS as BASE_PRESETS
from lab.bases import preset_path
from lab.channels import probes
from lab.channels.config import Config
from lab.channels.data import (
    CAPABILITIES,
    DAY_WORDS,
    NIGHT_WORDS,
    SELECTION,
    Item,
    heldout_items,
    with_training_words,
)
from lab.channels.model import ChannelModel, threads
from lab.channels.train import (
    KIND_ADAPTER,
    KIND_TEXT,
    NATIVE_MODELS,
    document_batch,
    heldout_state_documents,
    load,
    load_native,
    train_controls,
    train_or_load,
)
from lab.corpus import CAUTIOUS, PERMISSIVE, TIMES, load_tokenizer
from lab.report import Published, Report
from lab.stats import (
    Measure,
    compare_proportions,
    mcnemar_exact,
    mean_with_ci,
    paired_delta,
    paired_t,
    sign_flip_p,
    t_mean,
    wilson_ci,
)
from lab.store import Artifact, load_artifact, write_json

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
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def dominant(text: str, keys: list[list[str]], label: int) -> bool:
    """The marked candidate is referenced strictly more often than each of the others."""
    t = text.lower()
    counts = [sum(len(re.findall(r"(?<![a-z])" + re.escape(k.lower()) + r"(?![a-z])", t)) for k in ks) for ks in keys]
    return all(counts[label] > c for i, c in enumerate(counts) if i != label)


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


def first_clause(text: str) -> str:
    """The response's first clause: up to and including its first sentence end (. ! ? or a new line)."""
    m = re.search(r"[.!?\n]", text)
    return text if m is None else text[: m.end()]


def generations(model, items: Sequence[Item], zero: bool = False, max_new_tokens: int = 8,
                prefix: str | None = None) -> list[str]:
    """Greedy responses to the items' prompts (this arm's prompt), channels on (or zeroed). prefix "conflict": the
    competing state's text before the prompt; "agree": the item's own state as text before it."""
    ch = model.channels([it.state for it in items], zero=zero)
    return model.generate([_prefixed(model, it, prefix) for it in items], ch, max_new_tokens)


def _prefixed(model, it: Item, prefix: str | None) -> str:
    if prefix is None:
        return model.prompt_of(it)
    if prefix == "conflict":
        return it.conflict_text + model.prompt_of(it)
    if prefix == "agree":
        return it.text_state + model.prompt_of(it)
    raise LabError(f"prefix must be None, 'conflict' or 'agree', got {prefix!r}")


def references(text: str, keys: list[str]) -> int:
    """Whole-word occurrences of any of `keys` in `text` (case-insensitive)."""
    t = text.lower()
    return sum(len(re.findall(r"(?<![a-z])" + re.escape(k.lower()) + r"(?![a-z])", t)) for k in keys)


def pair_differences(items: Sequence[Item], values) -> np.ndarray:
    """Per register prompt pair (in order of first appearance): value at the +pole minus value at the -pole."""
    by_pair: dict[str, dict[int, float]] = {}
    for it, v in zip(items, np.asarray(values, float)):
        by_pair.setdefault(it.pair, {})[it.pole] = float(v)
    odd = [p for p, d in by_pair.items() if set(d) != {1, -1}]
    if odd:
        raise LabError(f"register prompt pairs {odd[:3]} do not have exactly two poles")
    return np.array([d[1] - d[-1] for d in by_pair.values()])


def ll_margins(model, items: Sequence[Item], **kw) -> np.ndarray:
    """(N,) log p(+pole word) - log p(-pole word) per register item (candidates are [+pole, -pole])."""
    lp = ll_choices(model, items, **kw)
    return lp[:, 0] - lp[:, 1]


def gen_signs(cap: str, items: Sequence[Item], texts: Sequence[str]) -> np.ndarray:
    """Per unit: +1 the output goes the channel's way, -1 the other way, 0 neither. Selection (per item): the marked
    item referenced more (+1) or less (-1) than the conflict text's competitor. Register (per pair): the +pole
    response scores higher (+1) or lower (-1) than the -pole response on the lexicon."""
    if cap in SELECTION:
        return np.array([np.sign(references(t, it.keys[it.label]) - references(t, it.keys[it.conflict_label]))
                         for it, t in zip(items, texts)])
    return np.sign(pair_differences(items, [lexicon_score(t, cap) for t in texts]))


def gen_success(cap: str, items: Sequence[Item], texts: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """Selection: dominant per item. Register: the per-pair lexicon difference (+pole minus -pole response).
    Returns (per-unit outcomes: bools for selection, differences for register, and example rows)."""
    if cap in SELECTION:
        ok = np.array([dominant(t, it.keys, it.label) for it, t in zip(items, texts)])
        return ok, [{"prompt": it.prompt, "marked": it.candidates[it.label].strip(), "response": t, "dominant": bool(o)}
                    for it, t, o in zip(items, texts, ok)]
    by_pair: dict[str, dict[int, str]] = {}
    for it, t in zip(items, texts):
        by_pair.setdefault(it.pair, {})[it.pole] = t
    diffs, rows = [], []
    for pair, d in by_pair.items():
        s_plus, s_minus = lexicon_score(d[1], cap), lexicon_score(d[-1], cap)
        diffs.append(s_plus - s_minus)
        rows.append({"pair": pair, "plus": d[1], "minus": d[-1], "score_plus": s_plus, "score_minus": s_minus,
                     "directional": s_plus > s_minus, "anti_directional": s_plus < s_minus})
    return np.array(diffs), rows


# --- the tests: each a function of outcomes, so each can be checked both ways on synthetic inputs -----------------

SIGN_TEST = "exact sign test (two-sided binomial, ties left out)"
HALF = "50%: as many units the other way"


def sign_test(name: str, differences, unit: str, permutation: bool = True) -> Measure:
    """The share of units going the channel's way (+) among those going either way, against 50% by an exact sign
    test; `permutation`: also the pole-label permutation null (swapping the labels within each unit flips the sign
    of its difference: a sign-flip test of the mean difference), as extra["p_permutation"]."""
    d = np.asarray(differences, float)
    k, m = int((d > 0).sum()), int((d < 0).sum())
    n = k + m
    if n:
        lo, hi = wilson_ci(k, n)
        meas = Measure(name, k / n, n, lo, hi, "wilson", HALF, 0.5, float(binomtest(k, n, 0.5).pvalue), SIGN_TEST)
    else:
        # no unit went either way: no evidence for either side (an exact sign test on no decided units has p = 1)
        meas = Measure(name, float("nan"), int(d.size), control=HALF, control_value=0.5, p_value=1.0, test=SIGN_TEST)
        meas.extra["why"] = f"all {d.size} units are ties: no unit went either way"
    meas.extra.update(unit=unit, channel_way=k, other_way=m, ties=int(d.size - n), n_units=int(d.size))
    if permutation:
        meas.extra["p_permutation"] = sign_flip_p(d) if d.size else 1.0
        meas.extra["permutation"] = "pole labels swapped within units (sign flip of the differences), two-sided"
    return meas


def above_chance(outcomes, chance: float) -> float:
    """One-sided exact binomial p of a success rate above its chance level."""
    ok = np.asarray(outcomes, bool)
    return float(binomtest(int(ok.sum()), int(ok.size), chance, alternative="greater").pvalue)


def vs_chance(name: str, outcomes, chance: float, unit: str) -> Measure:
    """A success rate (Wilson CI) against its chance level: exact two-sided binomial."""
    ok = np.asarray(outcomes, bool)
    k, n = int(ok.sum()), int(ok.size)
    lo, hi = wilson_ci(k, n)
    m = Measure(name, k / n, n, lo, hi, "wilson", f"chance ({chance:.3g})", chance,
                float(binomtest(k, n, chance).pvalue), "exact binomial (two-sided)")
    m.extra.update(unit=unit, chance=chance, p_above_chance=above_chance(ok, chance))
    return m


def follow_vs_agree(name: str, conflict_signs, agree_signs, unit: str) -> Measure:
    """Follows the channel against an opposing text, against the same units with a text agreeing with the channel
    (exact McNemar over units; a unit follows when its sign is +)."""
    m = compare_proportions(name, np.asarray(conflict_signs) > 0, np.asarray(agree_signs) > 0,
                            "text agreeing with the channel")
    m.extra["unit"] = unit
    return m


# the tests every reported measure uses (the `test` field), each checked both ways in the tests
REPORTED_TESTS = (SIGN_TEST, "exact McNemar", "exact binomial (two-sided)", "paired t-test", "one-sample t-test",
                  "paired sign-flip permutation (mean)", "sign-flip permutation (no spread for a t-test)")


def per_unit(items: Sequence[Item], ok) -> np.ndarray:
    """Outcomes per independent unit, in the items' order: a selection item's own; a register prompt pair's
    "both poles right". The two poles of a pair share the prompt and the candidates: counting both as items
    doubles n and makes every p too small."""
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


def unit_chance(items: Sequence[Item]) -> float:
    """The chance level of `per_unit` outcomes: 1/K per selection item, (1/2)^2 per register pair."""
    if not len(items) or not items[0].pair:
        return float(np.mean([1 / len(it.candidates) for it in items])) if len(items) else float("nan")
    return 0.25


def _share(m: Measure) -> float:
    """A sign test's share for across-seed tests: 1/2 (no evidence either way) when every unit tied."""
    return m.value if np.isfinite(m.value) else 0.5


# --- the report --------------------------------------------------------------------------------------

def evaluate_adapter(model, report: Report, config, text_model=None, log=print, examples: bool = True) -> dict:
    """Fill `report` with every adapter-track measure; returns per capability the raw outcomes and the per-run
    summary values the across-seed tests use."""
    raw = {}
    gen_examples: dict[str, list] = {}
    arms_rows = []
    conflict = {"ll": [], "gen": [], "gen_agree": []}
    G = config.gen_tokens
    for cap in config.capabilities:
        items = heldout_items(cap, config.n_heldout, seed=config.seed)
        n_prompts = len({it.prompt for it in items})
        sel = cap in SELECTION
        unit = "item" if sel else "prompt pair"
        summary = {}
        # log-likelihood
        full_unit = per_unit(items, ll_correct(model, items))
        if sel:
            zero = ll_correct(model, items, zero=True)
            m = compare_proportions(f"{cap}: LL picks the marked item", full_unit, zero, "channels zeroed")
            m.extra.update(chance=1 / 3, unit=unit, n_items=len(items), n_prompts=n_prompts,
                           p_above_chance=above_chance(full_unit, 1 / 3))
            report.add(m)
            summary.update(ll=m.value, ll_zero=float(zero.mean()))
        else:
            d = pair_differences(items, ll_margins(model, items))
            m = sign_test(f"{cap}: LL directional (held-out pole words)", d, unit)
            report.add(m)
            # the diagnostic: the same prompts and states, candidates from the training half of the pole pools
            dt = pair_differences(items, ll_margins(model, with_training_words(items, config.seed)))
            mt = sign_test(f"{cap}: LL directional, training-half pole words (diagnostic)", dt, unit)
            report.add(mt)
            both = vs_chance(f"{cap}: LL both poles right", full_unit, 0.25, "prompt pair (both poles)")
            both.extra["n_items"] = len(items)
            report.add(both)
            summary.update(ll=_share(m), ll_training_words=_share(mt))
        # generation: the first clause and the whole response, side by side
        texts = generations(model, items, max_new_tokens=G)
        if sel:
            texts_off = generations(model, items, zero=True, max_new_tokens=G)
            for part, f in (("first clause", first_clause), ("whole response", lambda t: t)):
                on, _ = gen_success(cap, items, [f(t) for t in texts])
                off, _ = gen_success(cap, items, [f(t) for t in texts_off])
                gm = compare_proportions(f"{cap}: generation dominant ({part})", on, off, "channels zeroed")
                gm.extra.update(metric="dominant", unit=unit, part=part)
                report.add(gm, Published(f"{cap} dominant, frozen-base adapter vs channel zeroed, held-out",
                                         PUBLISHED_SELECTION[cap], SRC) if part == "whole response" else None)
                summary[f"gen_{part}"], summary[f"gen_{part}_zero"] = float(on.mean()), float(off.mean())
        else:
            for part, f in (("first clause", first_clause), ("whole response", lambda t: t)):
                diffs, _ = gen_success(cap, items, [f(t) for t in texts])
                gm = sign_test(f"{cap}: generation directional ({part})", diffs, unit)
                gm.extra.update(metric="directional", part=part)
                report.add(gm, Published(f"{cap} directional, frozen-base adapter (their control, the channel "
                                         "zeroed, is degenerate by construction)", "100% vs 0%", SRC)
                           if part == "whole response" else None)
                summary[f"gen_{part}"] = _share(gm)
        _, rows_on = gen_success(cap, items, texts)
        if examples:
            gen_examples.setdefault("selection" if sel else "register", []).extend(
                {"capability": cap, **r} for r in rows_on[:3])
        # conflict: the channel says one state, a text prefix the competing one; against 50% and against agreement
        if sel:
            lp_c, lp_a = ll_choices(model, items, conflict=True), ll_choices(model, items, with_text=True)
            r = np.arange(len(items))
            lab, opp = np.array([it.label for it in items]), np.array([it.conflict_label for it in items])
            c_ll, a_ll = np.sign(lp_c[r, lab] - lp_c[r, opp]), np.sign(lp_a[r, lab] - lp_a[r, opp])
        else:
            c_ll = np.sign(pair_differences(items, ll_margins(model, items, conflict=True)))
            a_ll = np.sign(pair_differences(items, ll_margins(model, items, with_text=True)))
        cm = sign_test(f"{cap}: conflict (LL), follows the channel over an opposing text", c_ll, unit, permutation=False)
        report.add(cm)
        report.add(follow_vs_agree(f"{cap}: conflict (LL), follows the channel, opposing vs agreeing text",
                                   c_ll, a_ll, unit))
        c_gen = gen_signs(cap, items, generations(model, items, max_new_tokens=G, prefix="conflict"))
        a_gen = gen_signs(cap, items, generations(model, items, max_new_tokens=G, prefix="agree"))
        report.add(sign_test(f"{cap}: conflict (generation), follows the channel over an opposing text", c_gen, unit,
                             permutation=False))
        conflict["ll"].append(c_ll)
        conflict["gen"].append(c_gen)
        conflict["gen_agree"].append(a_gen)
        summary["conflict_ll"] = _share(cm)
        # three arms: channel / same state as text (equally trained) / neither
        text_base = per_unit(items, ll_correct(model, items, zero=True, with_text=True))
        seen_items = [replace(it, state=it.state_trained_frame) if it.state_trained_frame else it for it in items]
        full_seen = per_unit(items, ll_correct(model, seen_items)) if sel else full_unit
        zero_unit = per_unit(items, ll_correct(model, items, zero=True))
        chance = unit_chance(items)
        row = {"capability": cap, "n": len(full_unit), "unit": "item" if sel else "prompt pair (both poles)",
               "chance": round(chance, 4), "channel": float(full_unit.mean()),
               "p_channel_above_chance": above_chance(full_unit, chance),
               "channel_trained_frames": float(full_seen.mean()), "neither": float(zero_unit.mean()),
               "text_untrained_base": float(text_base.mean()), "tokens_channel": 0.0, "tokens_neither": 0.0}
        summary["channel_unit"] = float(full_unit.mean())
        if text_model is not None:
            text = per_unit(items, ll_correct(text_model, items))
            text_seen = per_unit(items, ll_correct(text_model, items, trained_frame=True))
            tok = text_model.base.tokenizer
            cost = float(np.mean([len(tok.encode(it.text_state, add_special_tokens=False)) for it in items]))
            mc = mcnemar_exact(full_unit, text)
            tm = compare_proportions(f"{cap}: channel arm vs text arm (LL)", full_unit, text,
                                     "state as text, equally trained")
            sizes = dict(channel_params=model.adapter.n_params(), text_params=text_model.adapter.n_params(),
                         text_lora_rank=text_model.text_lora.rank)
            tm.extra.update(text_prompt_tokens=cost, channel_prompt_tokens=0, neither=float(zero_unit.mean()),
                            text_trained_frames=float(text_seen.mean()), **sizes)
            report.add(tm)
            row.update(text=float(text.mean()), tokens_text=cost, p_channel_vs_text=mc["p_value"],
                       text_trained_frames=float(text_seen.mean()),
                       p_channel_vs_text_trained_frames=mcnemar_exact(full_seen, text_seen)["p_value"], **sizes)
            summary["text_unit"] = float(text.mean())
        arms_rows.append(row)
        raw[cap] = dict(summary=summary, conflict_ll=c_ll, conflict_gen=c_gen, agree_gen=a_gen)
        log(f"{cap:10s} LL {summary['ll']:.3f}; generation (whole response) {summary['gen_whole response']:.3f}; "
            f"conflict (LL) follows the channel {summary['conflict_ll']:.3f}"
            + (f"; text arm {row['text']:.3f} at {row['tokens_text']:.1f} prompt tokens" if text_model else ""))
    for kind, rows in gen_examples.items():
        report.tables[f"generation examples ({kind}, channels on)"] = rows
    report.tables["channel vs text vs neither (LL accuracy, prompt tokens per arm)"] = arms_rows
    report.tables["lexicons"] = [{"capability": c, "pole": s, "phrases": LEXICONS[c][s]} for c in LEXICONS for s in ("+", "-")] + [
        {"capability": "affect", "pole": "+/-", "phrases": ["VADER compound score (vaderSentiment)"]}]
    # pooled over capabilities (units: selection items and register pairs)
    unit = "selection item or register prompt pair"
    c_gen, a_gen = np.concatenate(conflict["gen"]), np.concatenate(conflict["gen_agree"])
    report.add(sign_test("all capabilities: conflict (generation), follows the channel over an opposing text", c_gen,
                         unit, permutation=False),
               Published("conflict (channel vs opposite text, generated responses): follows the channel",
                         "264/265 = 99.6%", SRC))
    report.add(follow_vs_agree("all capabilities: conflict (generation), follows the channel, opposing vs agreeing text",
                               c_gen, a_gen, unit))
    report.add(sign_test("all capabilities: conflict (LL), follows the channel over an opposing text",
                         np.concatenate(conflict["ll"]), unit, permutation=False))
    return raw


def across_adapter_seeds(report: Report, summaries: list[dict], seeds: list[int], text: bool) -> None:
    """The adapter arms' claims as claims about training runs: one value per seed, t tests across them."""
    k = len(seeds)
    unit = "training seed of the adapter (and text) arm"
    for cap in summaries[0]:
        col = lambda key: np.array([s[cap][key] for s in summaries])  # noqa: E731, B023
        sel = cap in SELECTION
        chance = 1 / 3 if sel else 0.5
        what = "LL picks the marked item" if sel else "LL directional share"
        m = t_mean(f"{cap}: {what}, across {k} adapter seeds", col("ll"), chance, "chance" if sel else HALF)
        m.extra.update(seeds=seeds, per_seed=col("ll").round(4).tolist(), unit=unit)
        report.add(m)
        if sel:
            g = paired_t(f"{cap}: generation dominant (whole response), across {k} adapter seeds",
                         col("gen_whole response"), col("gen_whole response_zero"), "channels zeroed")
        else:
            g = t_mean(f"{cap}: generation directional share (whole response), across {k} adapter seeds",
                       col("gen_whole response"), 0.5, HALF)
        g.extra.update(seeds=seeds, per_seed=col("gen_whole response").round(4).tolist(), unit=unit)
        report.add(g)
        c = t_mean(f"{cap}: conflict (LL) follow-the-channel share, across {k} adapter seeds", col("conflict_ll"),
                   0.5, HALF)
        c.extra.update(seeds=seeds, per_seed=col("conflict_ll").round(4).tolist(), unit=unit)
        report.add(c)
        if text:
            t = paired_t(f"{cap}: channel arm vs text arm (LL), across {k} adapter seeds", col("channel_unit"),
                         col("text_unit"), "state as text, equally trained")
            t.extra.update(seeds=seeds, unit=unit)
            report.add(t)


def _batched(fn, items, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([fn(items[i: i + batch]).cpu().numpy() for i in range(0, len(items), batch)])


def native_losses(model, items: Sequence[Item], docs, tok, seq: int) -> dict[str, np.ndarray]:
    """One native model's held-out losses: per item of its target tokens ("targets"), per state-bearing document
    ("documents"); the channel model also with its channels zeroed ("..._zeroed")."""
    out = {}
    zeros = (False, True) if model.cm is not None else (False,)
    for zero in zeros:
        sfx = "_zeroed" if zero else ""
        out["targets" + sfx] = _batched(lambda b, z=zero: model.item_losses(b, zero=z), list(items))
        parts = []
        for i in range(0, len(docs), 64):
            ids, att, states = document_batch(tok, docs[i: i + 64], seq)
            with torch.no_grad():
                parts.append(model.doc_losses(ids, att, states, zero=zero).cpu().numpy())
        out["documents" + sfx] = np.concatenate(parts)
    return out


def evaluate_native(config, text_base, report: Report, runs: Sequence[dict], log=print) -> None:
    """The native track, per training seed (one {model: dir} each, `train.native_run_dirs`): the held-out loss of
    the targets of state-bearing held-out examples (the items' responses given their prompts), and of held-out
    state-bearing corpus documents, for the channel model with its channels on and zeroed and for the channel-less
    baselines (paired over items / documents: evaluation noise only), and whether the channel decides the preferred
    continuation of held-out selection items (McNemar against zeroed) and of register pairs (sign test); then the same
    questions across seeds (paired / one-sample t over per-seed values): each seed is one independent training run."""
    if not runs:
        raise LabError("evaluate_native needs at least one training seed's native models, got none")
    loaded = [{k: load_native(p, text_base) for k, p in paths.items()} for paths in runs]
    shared = {(m.config.native_seq, m.config.native_docs, m.config.preset_name) for run in loaded for m in run.values()}
    if len(shared) != 1:
        raise LabError(f"the native models were trained with different (window, documents, preset) settings {sorted(shared)}; "
                       "retrain them together with `lab train channels --force`")
    seq, _, preset = shared.pop()
    for paths, run in zip(runs, loaded):
        seeds = {k: m.config.seed for k, m in run.items()}
        if len(set(seeds.values())) != 1:
            raise LabError(f"one run's models have different training seeds {seeds} ({paths['channels'].parent})")
        missing = [k for k in NATIVE_MODELS if k not in run]
        if missing:
            raise LabError(f"native run {paths['channels'].parent} lacks models {missing}")
    tok = load_tokenizer()
    docs = heldout_state_documents(next(iter(loaded[0].values())).config, Config.native_windows(preset))
    items = {cap: heldout_items(cap, config.n_heldout, seed=config.seed) for cap in config.capabilities}
    all_items = [it for c in config.capabilities for it in items[c]]
    theirs_loss = Published("native, channels zeroed minus each channel-less baseline, held-out loss (held-out "
                            "targets of state-bearing examples)", "-0.427 / -0.428 nats (4.825 vs 5.252 / 5.253)", SRC)
    theirs_decides = Published("native: channel decides the preferred output (counterfactual pairs, chance 25% there; "
                               "here selection items, chance 1/3)", "88.8% of 455", SRC)
    one = len(runs) == 1
    per_seed, table = [], []
    for models in loaded:
        seed = models["channels"].config.seed
        losses = {k: native_losses(m, all_items, docs, tok, seq) for k, m in models.items()}
        ch = losses["channels"]
        unit_t = "held-out item (its target tokens), the same for every seed: evaluation noise, not training runs"
        d = paired_delta(f"native seed {seed}: held-out target loss, channels zeroed minus baseline-width",
                         ch["targets_zeroed"], losses["baseline-width"]["targets"], "baseline-width")
        d.extra.update(unit=unit_t, training_seed=seed)
        report.add(d)
        for b in ("baseline-small", "baseline-large"):
            db = paired_delta(f"native seed {seed}: held-out target loss, channels zeroed minus {b}",
                              ch["targets_zeroed"], losses[b]["targets"], b)
            db.extra.update(unit=unit_t, training_seed=seed, n_params_channels=models["channels"].meta["n_params"],
                            n_params_baseline=models[b].meta["n_params"])
            report.add(db, theirs_loss if one else None)
        on = paired_delta(f"native seed {seed}: held-out target loss, channels on minus zeroed", ch["targets"],
                          ch["targets_zeroed"], "channels zeroed")
        on.extra.update(unit=unit_t, training_seed=seed)
        report.add(on)
        table += [{"seed": seed, "model": k, "n_params": m.meta["n_params"],
                   "target_loss": float(losses[k]["targets"].mean()),
                   "target_loss_zeroed": float(losses[k]["targets_zeroed"].mean()) if k == "channels" else None,
                   "document_loss": float(losses[k]["documents"].mean()),
                   "document_loss_zeroed": float(losses[k]["documents_zeroed"].mean()) if k == "channels" else None,
                   "n_items": len(all_items), "n_documents": len(docs)} for k, m in models.items()]
        # does the channel decide the preferred continuation? selection items against zeroed; register pairs' sign test
        cm = models["channels"].cm
        sel = [c for c in config.capabilities if c in SELECTION]
        reg = [c for c in config.capabilities if c not in SELECTION]
        row = {"seed": seed, **{f"{k}:{part}": float(v.mean()) for k, ls in losses.items() for part, v in ls.items()}}
        if sel:
            full = np.concatenate([ll_correct(cm, items[c]) for c in sel])
            zero = np.concatenate([ll_correct(cm, items[c], zero=True) for c in sel])
            m = compare_proportions(f"native seed {seed}: channel decides the preferred continuation (held-out "
                                    "selection items)", full, zero, "channels zeroed")
            m.extra.update(chance=1 / 3, training_seed=seed, p_above_chance=above_chance(full, 1 / 3))
            report.add(m, theirs_decides if one else None)
            row.update(decides=float(full.mean()), decides_zeroed=float(zero.mean()))
        if reg:
            dd = np.concatenate([pair_differences(items[c], ll_margins(cm, items[c])) for c in reg])
            rm = sign_test(f"native seed {seed}: register LL directional (held-out pairs)", dd, "prompt pair")
            rm.extra["training_seed"] = seed
            report.add(rm)
            row["directional"] = _share(rm)
        per_seed.append(row)
        log(f"native seed {seed}: held-out target loss on {ch['targets'].mean():.4f}, zeroed "
            f"{ch['targets_zeroed'].mean():.4f}, baselines width/small/large "
            + " / ".join(f"{losses[b]['targets'].mean():.4f}" for b in NATIVE_MODELS[1:]))
    report.tables["native models"] = table
    seeds = [r["seed"] for r in per_seed]
    if one:
        report.notes.append(f"Native track: one training seed ({seeds[0]}); its p-values cover held-out items and "
                            "documents, not the variation between training runs (set native_seeds for that).")
        return
    col = lambda k: np.array([r[k] for r in per_seed])  # noqa: E731
    k = len(runs)
    unit = "training seed (each its own initialisation and data order, shared by its models)"
    pairs = [("targets", "channels:targets_zeroed", b, f"{b}:targets") for b in NATIVE_MODELS[1:]]
    pairs += [("targets", "channels:targets", "baseline-width", "baseline-width:targets"),
              ("targets", "channels:targets", "channels zeroed", "channels:targets_zeroed"),
              ("documents", "channels:documents", "channels zeroed", "channels:documents_zeroed"),
              ("documents", "channels:documents_zeroed", "baseline-width", "baseline-width:documents"),
              ("documents", "channels:documents", "baseline-width", "baseline-width:documents")]
    names = {"channels:targets_zeroed": "channels zeroed", "channels:targets": "channels on",
             "channels:documents_zeroed": "channels zeroed", "channels:documents": "channels on"}
    for what, a, bname, b in pairs:
        label = "held-out target loss" if what == "targets" else "held-out state-bearing document loss"
        m = paired_t(f"native: {label}, {names[a]} minus {bname}, across {k} training seeds", col(a), col(b), bname)
        m.extra.update(seeds=seeds, per_seed=(col(a) - col(b)).round(5).tolist(), unit=unit)
        theirs = theirs_loss if (what == "targets" and a == "channels:targets_zeroed"
                                 and bname in ("baseline-small", "baseline-large")) else None
        report.add(m, theirs)
    if "decides" in per_seed[0]:
        rate = t_mean(f"native: channel decides the preferred continuation (selection rate), across {k} training seeds",
                      col("decides"), 1 / 3, "chance")
        rate.extra.update(seeds=seeds, per_seed=col("decides").tolist(), unit=unit)
        report.add(rate, theirs_decides)
        gain = paired_t(f"native: channel decides, full minus zeroed rate, across {k} training seeds",
                        col("decides"), col("decides_zeroed"), "channels zeroed")
        gain.extra.update(seeds=seeds, per_seed=(col("decides") - col("decides_zeroed")).round(5).tolist(), unit=unit)
        report.add(gain)
    if "directional" in per_seed[0]:
        dm = t_mean(f"native: register LL directional share, across {k} training seeds", col("directional"), 0.5, HALF)
        dm.extra.update(seeds=seeds, per_seed=col("directional").tolist(), unit=unit)
        report.add(dm)


# --- the channels report ---------------------------------------------------------------------------

def _text_model(text_artifact, base, model, log):
    """The text arm for `model` (None if not given or of an older format: then also a note)."""
    if text_artifact is None:
        return None, None
    if not isinstance(text_artifact, Artifact):
        text_artifact = load_artifact(Path(text_artifact), KIND_TEXT, base)
    if text_artifact.config.get("format") != Config.FORMAT:  # e.g. a text arm of an earlier adapter layout
        stale = (f"The text arm at {text_artifact.path} has format {text_artifact.config.get('format')}, "
                 f"this lab's is {Config.FORMAT}: the channel-vs-text arms were skipped; retrain it with "
                 f"`lab train channels`.")
        log(stale)
        return None, stale
    return load(text_artifact, base, text_encoder=model.text_encoder), None


def evaluate(model: ChannelModel, text_artifact: Artifact | Path | None = None,
             native_runs: list[dict] | None = None, attribution: bool = True, log=print,
             seeds: Sequence[tuple] = (), modes: dict | None = None) -> Report:
    """The channels report of a loaded channel-arm model (`load` / `train_or_load`): per capability n, rate,
    control and test (LL and generation versions, first clause and whole response), conflict tests, channel-vs-text
    arms (with `text_artifact`), the further adapter seeds (`seeds`: (adapter, text arm or None) artifact pairs) with
    across-seed t tests, other injection modes (`modes`: {mode: adapter artifact}, their measures marked "[<mode>]"),
    the native track (with `native_runs`, one {model: dir} per training seed), alpha probes and captum attribution.
    Sizes come from the model's own config. Writes nothing: the caller saves it (`rep.save(dir)`, then
    `write_lexicons(dir)`)."""
    artifact = getattr(model, "artifact", None)
    if artifact is None or artifact.kind != KIND_ADAPTER:
        raise LabError(f"evaluate needs a trained channel-arm model (from `load` or `train_or_load`), got "
                       f"{'an untrained model' if artifact is None else f'a {artifact.kind!r} artifact'}")
    base, config = model.base, model.config
    t0 = time.perf_counter()
    with threads(1):
        text_model, stale_text = _text_model(text_artifact, base, model, log)
        rep = Report(f"Proprioceptive channels on {base.name} ({config.preset_name}, {config.mode})")
        rep.provenance = {"base": base.name, "base_fingerprint": base.fingerprint[:12], "artifact": str(artifact.path),
                          "config_hash": artifact.manifest.get("config_hash"), "seed": config.seed,
                          "text_encoder": model.text_encoder.name, "site": config.site, "mode": config.mode}
        raw = evaluate_adapter(model, rep, config, text_model, log=log)
        if seeds:
            summaries = [{c: r["summary"] for c, r in raw.items()}]
            for adapter, text in seeds:
                m = load(adapter, base, text_encoder=model.text_encoder)
                tm, _ = _text_model(text, base, model, log)
                log(f"adapter seed {m.config.seed}:")
                r = evaluate_adapter(m, Report("scratch"), m.config, tm if text_model is not None else None,
                                     log=log, examples=False)
                summaries.append({c: v["summary"] for c, v in r.items()})
            across_adapter_seeds(rep, summaries, [config.seed] + [load_artifact(Path(a.path), KIND_ADAPTER).config["seed"]
                                                                   for a, _ in seeds], text_model is not None)
        for mode, adapter in (modes or {}).items():
            m = load(adapter, base, text_encoder=model.text_encoder)
            log(f"[{mode}]:")
            orep = Report("scratch")
            evaluate_adapter(m, orep, m.config, None, log=log, examples=False)
            for meas in orep.measures:
                meas.name = f"[{mode}] {meas.name}"
                rep.add(meas)
            rep.provenance[f"{mode} artifact"] = str(m.artifact.path)
            rep.tables[f"[{mode}] alpha (final, layer x channel)"] = m.injector.alpha_table()
        if native_runs:
            evaluate_native(config, base, rep, native_runs, log=log)
        metrics = artifact.manifest.get("metrics", {})
        names = model.injector.names
        rep.figures["alpha_heatmap"] = probes.alpha_heatmap(model.injector.alpha, names)
        if metrics.get("alpha_history"):
            rep.figures["alpha_trajectory"] = probes.alpha_trajectory(metrics["alpha_history"], names)
        rep.tables["alpha (final, layer x channel)"] = model.injector.alpha_table()
        if attribution:
            rows = probes.channel_attribution(model, attribution_items(config))
            rep.figures["attribution"] = probes.attribution_figure(rows, names)
            rep.tables["captum attribution share (mean over items, 95% bootstrap CI)"] = attribution_table(rows, names)
            rep.notes.append("Attribution: integrated gradients from all channels zeroed; a channel's score is "
                             "|sum of its dimensions' IG|, so it does not grow with the channel's width.")
        rep.notes += [
            "Held-out items use templates, channel texts and entities disjoint from training (lab.channels.data); "
            "validation (the training curve, the learning-rate sweep) uses training templates and entities, its own "
            "draws.",
            f"Targets: {config.targets!r} (the adapter is trained to give "
            + ("a short templated response using the marked item or the state's register" if config.targets == "response"
               else "the one-word target") + f"); generation is {config.gen_tokens} greedy tokens, scored on the "
            "first clause and on the whole response.",
            "'Channels zeroed' removes the channels' contribution exactly (bias-free projections). Register "
            "outcomes are not compared with the zeroed arm: zeroed, both poles see one input, so the comparison is "
            "decided by construction. They are tested by directional against anti-directional pairs (sign test) "
            "and a pole-label permutation null ('p_permutation'); 'both poles right' against its chance 1/4.",
            "Conflict: the follow-the-channel share is tested against 50% (sign test over units that went either "
            "way) and against the same units with a text that agrees with the channel (McNemar).",
        ]
        if stale_text:
            rep.notes.append(stale_text)
        if text_model is not None:
            rep.notes.append(
                f"Text arm: LoRA (rank {text_model.text_lora.rank}) on a copy of the base with "
                f"{text_model.adapter.n_params():,} trainable parameters against the injector's "
                f"{model.adapter.n_params():,}, the same batches, steps and schedule, its own learning rate "
                f"({text_model.config.text_lr:g}; the injector's gates {model.config.lr:g}). Its state text is worded "
                "in held-out frames ('text'), and in training frames as a control for unseen wording "
                "('text_trained_frames'); the channel arm's control of the same kind is 'channel_trained_frames' "
                "(selection texts in training frames; register channels have one format in both splits).")
        rep.notes.append(f"Evaluation took {time.perf_counter() - t0:.0f} s.")
    return rep


def attribution_table(rows: list[dict], names) -> list[dict]:
    """Per capability: n items and each channel's mean attribution share with a bootstrap CI over items."""
    out = []
    for cap in dict.fromkeys(r["capability"] for r in rows):
        mine = [r for r in rows if r["capability"] == cap]
        out.append({"capability": cap, "n": len(mine), **{n: mean_with_ci(n, [r[n] for r in mine]).value_text(3)
                                                          for n in names}})
    return out


def attribution_items(config: Config) -> list[Item]:
    """Held-out items whose OTHER channels carry a background state (from other held-out items), so the
    attribution has to choose among six live channels; an off channel would get exactly 0 by construction."""
    pools = {cap: heldout_items(cap, config.n_attribution, config.seed + 7) for cap in CAPABILITIES}
    rng = random.Random(config.seed)
    out = []
    for cap in config.capabilities:
        for it in [i for i in heldout_items(cap, config.n_attribution, config.seed) if i.pole >= 0][: config.n_attribution]:
            it = copy.deepcopy(it)
            for other in CAPABILITIES:
                if other != cap:
                    it.state.update({k: v for k, v in rng.choice(pools[other]).state.items() if k == other})
            out.append(it)
    return out


def write_lexicons(out_dir: Path) -> None:
    """lexicons.json beside a saved report: the phrase lists the judge-free generation scoring used."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "lexicons.json", {**LEXICONS, "affect": "vaderSentiment compound"})


# --- the whole pipeline ----------------------------------------------------------------------------

def _on_disk(name: str) -> bool:
    return (preset_path(name) / "config.json").exists() if name in BASE_PRESETS else Path(name).is_dir()


def _quiet(*_args) -> None:
    pass


def run(config: Config, base=None, *, progress: bool = True, attribution: bool = True) -> Report:
    """The channels experiment end to end: train what is missing (the adapter and the text arm if
    `config.train_text_arm`, for each of `adapter_seeds`; the other `compare_modes`; the native track if
    `config.native`), evaluate and probe; one Report. `base=None`
    loads `config.base` (`config.load_base()`). Each of `config.extra_bases` that is on disk joins the report
    with its adapter track (`Config.on_base`: no text arm, no native track, no attribution), its measures and
    tables marked "[<base>]" and its figures "_<base>". `progress=False` silences the log lines."""
    log = print if progress else _quiet
    base = base if base is not None else config.load_base()
    model = train_or_load(config, base)
    controls = train_controls(config, base)
    rep = evaluate(model, text_artifact=controls.text, native_runs=controls.native, attribution=attribution, log=log,
                   seeds=controls.seeds or (), modes=controls.modes)
    for name in config.extra_bases:
        if not _on_disk(name):
            log(f"{name} is not on disk: its adapter track is left out of the report (`lab pretrain {name}`)")
            continue
        other = config.on_base(name)
        obase = other.load_base()
        orep = evaluate(train_or_load(other, obase), attribution=False, log=log)
        for m in orep.measures:
            published = orep.published.get(m.name)
            m.name = f"[{name}] {m.name}"
            rep.add(m, published)
        rep.figures.update({f"{k}_{name.replace('-', '_')}": fig for k, fig in orep.figures.items()})
        rep.tables.update({f"[{name}] {k}": t for k, t in orep.tables.items() if k != "lexicons"})
        rep.provenance[f"{name} artifact"] = orep.provenance["artifact"]
    return rep
