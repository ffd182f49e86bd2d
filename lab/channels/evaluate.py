"""Judge-free, held-out evaluation of the channels, and `run`: the whole pipeline.

    report = run(Config.preset("smoke"))          # train what is missing, evaluate, probe: one Report
    report = evaluate(train_or_load(config, base), text_artifact=..., native_runs=...)

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
from lab.channels.data import CAPABILITIES, DAY_WORDS, NIGHT_WORDS, SELECTION, Item, heldout_items
from lab.channels.model import ChannelModel, threads
from lab.channels.train import KIND_ADAPTER, KIND_TEXT, load, load_native, train_controls, train_or_load
from lab.corpus import CAUTIOUS, PERMISSIVE, TIMES, corpus_tokens, load_tokenizer, token_windows
from lab.report import Published, Report
from lab.stats import compare_proportions, mcnemar_exact, mean_with_ci, paired_delta, paired_t, t_mean
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
    n = min(n_windows, (len(stream) - 1) // seq)
    offs = np.arange(n) * seq
    out = []
    with torch.no_grad():
        for i in range(0, n, 16):
            x = token_windows(stream, offs[i: i + 16], seq)
            logits = model.base.model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
            out += loss.tolist()
    return np.array(out)


def evaluate_native(config, text_base, report: Report, runs: Sequence[dict], log=print) -> None:
    """The native track: per training seed (one {model: dir} each, `train.native_run_dirs`), held-out loss of the
    channel model with its channels zeroed against the two channel-less baselines of the same seed (paired over
    held-out windows: evaluation noise only), and whether the channel decides the preferred continuation (McNemar
    over held-out items); then the same questions across seeds (paired t over per-seed values), the test of
    whether *training with channels* makes the difference, since each seed is one independent training run.
    Every seed is scored on the same held-out windows and items. `config` gives the held-out items (the adapter's
    draw); the windows follow the native models' own settings."""
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
    n_win = Config.native_windows(preset)
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


# --- the channels report ---------------------------------------------------------------------------

def evaluate(model: ChannelModel, text_artifact: Artifact | Path | None = None,
             native_runs: list[dict] | None = None, attribution: bool = True, log=print) -> Report:
    """The channels report of a loaded channel-arm model (`load` / `train_or_load`): per capability n, rate,
    control and exact McNemar p (LL and generation versions), conflict test, channel-vs-text arms (with
    `text_artifact`), native track (with `native_runs`, one {model: dir} per training seed), alpha probes and
    captum attribution. Sizes come from the model's own config. Writes nothing: the caller saves it
    (`rep.save(dir)`, then `write_lexicons(dir)`)."""
    artifact = getattr(model, "artifact", None)
    if artifact is None or artifact.kind != KIND_ADAPTER:
        raise LabError(f"evaluate needs a trained channel-arm model (from `load` or `train_or_load`), got "
                       f"{'an untrained model' if artifact is None else f'a {artifact.kind!r} artifact'}")
    base, config = model.base, model.config
    t0 = time.perf_counter()
    stale_text = None
    if text_artifact is not None:
        if not isinstance(text_artifact, Artifact):
            text_artifact = load_artifact(Path(text_artifact), KIND_TEXT, base)
        if text_artifact.config.get("format") != Config.FORMAT:  # e.g. a text arm of an earlier adapter layout
            stale_text = (f"The text arm at {text_artifact.path} has format {text_artifact.config.get('format')}, "
                          f"this lab's is {Config.FORMAT}: the channel-vs-text arms were skipped; retrain it with "
                          f"`lab train channels`.")
            log(stale_text)
            text_artifact = None
    with threads(1):
        text_model = load(text_artifact, base, text_encoder=model.text_encoder) if text_artifact else None
        rep = Report(f"Proprioceptive channels on {base.name} ({config.preset_name}, {config.mode})")
        rep.provenance = {"base": base.name, "base_fingerprint": base.fingerprint[:12], "artifact": str(artifact.path),
                          "config_hash": artifact.manifest.get("config_hash"), "seed": config.seed,
                          "text_encoder": model.text_encoder.name, "site": config.site, "mode": config.mode}
        evaluate_adapter(model, rep, config, text_model, log=log)
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
            "Held-out items use templates, channel texts and entities disjoint from training (lab.channels.data).",
            "'Channels zeroed' removes the channels' contribution exactly (bias-free projections).",
            "Register 'directional' with channels zeroed is degenerate by construction (both poles give the same "
            "text), as in the published work. So is the register LL version's, counted per prompt pair (both "
            "poles right): zeroed, the two poles see one input and at most one can be right. Its informative test "
            "is against chance (1/4 per pair: the one-sided binomial `p_channel_above_chance` in the arms table) "
            "and against the text arm.",
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
    """The channels experiment end to end: train what is missing (the adapter, the text arm if
    `config.train_text_arm`, the native track if `config.native`), evaluate and probe; one Report. `base=None`
    loads `config.base` (`config.load_base()`). Each of `config.extra_bases` that is on disk joins the report
    with its adapter track (`Config.on_base`: no text arm, no native track, no attribution), its measures and
    tables marked "[<base>]" and its figures "_<base>". `progress=False` silences the log lines."""
    log = print if progress else _quiet
    base = base if base is not None else config.load_base()
    model = train_or_load(config, base)
    controls = train_controls(config, base)
    rep = evaluate(model, text_artifact=controls.text, native_runs=controls.native, attribution=attribution, log=log)
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
