"""Proprioceptive channels (tinyMARS re-implemented): six state channels -- memory, affect, time, ethics,
identity, continuity -- injected into every layer of a base through ReZero gates that start at 0.

    from lab.channels import Config, build, train, evaluate, reproduce_section
    cfg = Config.preset("tiny")
    art = train(cfg, base)                       # adapter track: only the injection trains
    report = evaluate(art, base)                 # held-out, judge-free, McNemar vs channels zeroed

Modules: injection (the gates, via lab.hooks), encoders (state -> vectors), data (counterfactual corpus),
model (Config, ChannelModel), train (adapter, text arm, native track), eval (metrics), probes (alpha,
captum, log-prob shifts), cli (`lab train channels`, `lab evaluate channels`).
"""

from __future__ import annotations

import time
from pathlib import Path

from lab import LabError
from lab.channels.data import CAPABILITIES
from lab.channels.encoders import ChannelState, TextEncoder
from lab.channels.injection import CHANNELS, ChannelInjector, inject
from lab.channels.model import ChannelModel, Config, build
from lab.channels.train import (KIND_ADAPTER, KIND_TEXT, artifact_root, load_model, train, train_native)
from lab.report import Report
from lab.store import Artifact, load_artifact

__all__ = ["Config", "build", "train", "evaluate", "reproduce_section", "ChannelModel", "ChannelInjector",
           "ChannelState", "TextEncoder", "inject", "CHANNELS", "CAPABILITIES", "load_model", "train_all",
           "write_lexicons"]


def train_all(config: Config, base, force: bool = False, native: bool | None = None) -> dict:
    """Everything the report needs for this preset: adapter, text arm, native models (each skipped if on disk)."""
    from lab.channels.eval import threads
    with threads(1):
        out = {"adapter": train(config, base, force=force)}
        if config.train_text_arm:
            out["text"] = train(config, base, arm="text", force=force)
        if config.native if native is None else native:
            out["native"] = train_native(config, base, force=force)
    return out


def evaluate(artifact: Artifact | Path | str, base, text_artifact: Artifact | Path | None = None,
             native_runs: list[dict] | None = None, attribution: bool = True, log=print) -> Report:
    """The channels report: per capability n, rate, control and exact McNemar p (LL and generation
    versions), conflict test, channel-vs-text arms, native track, alpha probes and captum attribution.
    Writes nothing: the caller saves it (`rep.save(dir)`, then `write_lexicons(dir)`)."""
    from lab.channels import probes
    from lab.channels.data import heldout_items
    from lab.channels.eval import evaluate_adapter, evaluate_native, threads

    if isinstance(artifact, (str, Path)):
        artifact = load_artifact(Path(artifact), KIND_ADAPTER, base)
    if artifact.kind != KIND_ADAPTER:
        raise LabError(f"{artifact.path} holds a {artifact.kind!r} artifact, expected {KIND_ADAPTER!r}")
    t0 = time.perf_counter()
    stale_text = None
    if text_artifact is not None:
        if not isinstance(text_artifact, Artifact):
            text_artifact = load_artifact(Path(text_artifact), KIND_TEXT, base)
        if text_artifact.config.get("format") != Config.FORMAT:  # e.g. the bias text arm before session 15
            stale_text = (f"The text arm at {text_artifact.path} has format {text_artifact.config.get('format')}, "
                          f"this lab's is {Config.FORMAT}: the channel-vs-text arms were skipped; retrain it with "
                          f"`lab train channels`.")
            log(stale_text)
            text_artifact = None
    with threads(1):
        model = load_model(artifact, base)
        config = model.config
        text_model = load_model(text_artifact, base, text_encoder=model.text_encoder) if text_artifact else None
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
            items = _attribution_items(config)
            rows = probes.channel_attribution(model, items)
            rep.figures["attribution"] = probes.attribution_figure(rows, names)
            rep.tables["captum attribution share (mean over items, 95% bootstrap CI)"] = _attribution_table(rows, names)
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


def _attribution_table(rows: list[dict], names) -> list[dict]:
    """Per capability: n items and each channel's mean attribution share with a bootstrap CI over items."""
    from lab.stats import mean_with_ci
    out = []
    for cap in dict.fromkeys(r["capability"] for r in rows):
        mine = [r for r in rows if r["capability"] == cap]
        row = {"capability": cap, "n": len(mine)}
        for n in names:
            m = mean_with_ci(n, [r[n] for r in mine])
            row[n] = f"{m.value:.3f}" + ("" if m.ci_low is None else f" [{m.ci_low:.3f}, {m.ci_high:.3f}]")
        out.append(row)
    return out


def write_lexicons(out_dir: Path) -> None:
    """lexicons.json beside a saved report: the phrase lists the judge-free generation scoring used."""
    from lab.channels.eval import LEXICONS
    from lab.store import write_json
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "lexicons.json", {**LEXICONS, "affect": "vaderSentiment compound"})


def _attribution_items(config) -> list:
    """Held-out items whose OTHER channels carry a background state (from other held-out items), so the
    attribution has to choose among six live channels; an off channel would get exactly 0 by construction."""
    import copy
    import random

    from lab.channels.data import heldout_items
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


def reproduce_section(preset: str, seed: int, out_dir: Path) -> Report:
    """Train what is missing for the preset (adapter on its base, text arm, native track) and evaluate.
    On "tiny" the adapter track also runs on tiny-mamba2 when that base is on disk (its measures, tables
    and figures join the same report, marked "[tiny-mamba2]" / "_tiny_mamba2"). Writes only lexicons.json
    to out_dir: the caller (`lab reproduce`) saves the report and its figures, once."""
    from lab.bases import load_base, preset_path
    from lab.pretrain import ensure_base
    config = Config.preset(preset, seed=seed)
    base = ensure_base(config.base)
    arts = train_all(config, base)
    rep = evaluate(arts["adapter"], base, text_artifact=arts.get("text"), native_runs=arts.get("native"))
    if preset == "tiny" and (preset_path("tiny-mamba2") / "config.json").exists():
        mcfg = Config.preset(preset, seed=seed, base="tiny-mamba2", train_text_arm=False, native=False)
        mbase = load_base("tiny-mamba2")
        marts = train_all(mcfg, mbase)
        mrep = evaluate(marts["adapter"], mbase, attribution=False)
        for m in mrep.measures:
            m.name = f"[tiny-mamba2] {m.name}"
            rep.add(m, mrep.published.get(m.name.split("] ", 1)[1]))
        rep.figures.update({f"{k}_tiny_mamba2": fig for k, fig in mrep.figures.items()})
        rep.tables.update({f"[tiny-mamba2] {k}": t for k, t in mrep.tables.items() if k != "lexicons"})
        rep.provenance["tiny-mamba2 artifact"] = mrep.provenance["artifact"]
    write_lexicons(Path(out_dir))
    return rep
