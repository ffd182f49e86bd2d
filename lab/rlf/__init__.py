"""Recursive Latent Forcing: a frozen base encodes the prompt once; a small core loops over the
residual stream, re-fed the prompt through a per-dimension lifeline gate, told its loop index by
RoPE, supervised at every loop, and taught to emit HALT.

    from lab.rlf import Config, build, train, load, evaluate, probe_report
    cfg = Config.preset("tiny")                  # tiny-gpt2, transformer core
    model = load(train(cfg))                     # models/rlf-tiny-tiny-gpt2-transformer/
    report = evaluate(model)                     # 1-12 hops, baselines, lifeline ablations
"""

from __future__ import annotations

from pathlib import Path

from lab.rlf.config import PRESETS, Config
from lab.rlf.model import RLF, Lifeline, build

__all__ = ["Config", "PRESETS", "RLF", "Lifeline", "build", "train", "load", "evaluate", "probe_report",
           "reproduce_section", "BASELINES"]

# The baselines every report carries (same base, core, data, steps and seed as the method).
BASELINES = {"no lifeline": {"lifeline": False}, "no loop-RoPE": {"loop_rope": False},
             "answer-only supervision": {"supervision": "answer_only"}}
N_NULL_RUNS = 2  # shuffled-supervision control runs for the null-calibrated gate rule


def train(config, base=None, out_dir=None, **kw):
    from lab.rlf.training import train as _train
    return _train(config, base, out_dir, **kw)


def load(path_or_artifact, base=None):
    from lab.rlf.training import load as _load
    return _load(path_or_artifact, base)


def evaluate(model_or_path, base=None, **kw):
    from lab.rlf.evaluation import evaluate as _evaluate
    return _evaluate(model_or_path, base, **kw)


def probe_report(model, problems, null_models=None, **kw):
    from lab.rlf.probes import probe_report as _probe_report
    return _probe_report(model, problems, null_models, **kw)


def reproduce_section(preset: str, seed: int, out_dir: Path, core: str = "transformer",
                      baselines: bool = True, n_null: int = N_NULL_RUNS):
    """Train what is missing for `preset` (method, baselines, shuffled-supervision controls), then
    evaluate and probe; writes the report to out_dir and returns it (`lab reproduce` calls this)."""
    from lab.pretrain import ensure_base
    from lab.rlf.data import heldout_set
    from lab.rlf.training import train_or_load

    cfg = Config.preset(preset, core=core, seed=seed)
    base = ensure_base(cfg.base)
    model = train_or_load(cfg, base)
    bl = {name: train_or_load(cfg.with_(**kw), base) for name, kw in BASELINES.items()} if baselines else {}
    nulls = [train_or_load(cfg.with_(shuffle_supervision=True, seed=seed + 1 + i), base) for i in range(n_null)]
    rep = evaluate(model, baselines=bl, progress=False)
    n_probe = 24 if preset == "smoke" else 100
    problems = [p for h in range(1, cfg.max_train_hops + 1) for p in heldout_set(h, max(n_probe, cfg.test_n), seed)[:n_probe]]
    pr = probe_report(model, problems, nulls, umap=preset != "smoke", n_attr=6 if preset == "smoke" else 40, seed=seed)
    rep.measures += pr.measures
    rep.published.update(pr.published)
    rep.notes += pr.notes
    rep.figures.update(pr.figures)
    rep.provenance["null_runs"] = [str(m.artifact.path) for m in nulls]
    return rep  # lab.reproduce saves it (every figure in every format) under out_dir
