"""Thinking combiner: one (or k) Coconut-style latent steps on a frozen base, mixed linearly into the
final-normed state, h' = (1 + alpha) h + M T_k + beta (identity at zero init), measured in bits per byte.

    from lab.combiner import Config, evaluate, run, train_or_load
    config = Config.preset("smoke")
    report = run(config)                                  # fit what is missing, evaluate: one Report
    model = train_or_load(config, config.load_base())     # the fitted combiners: model[("ce", 1)], model.control
    report = evaluate(model)                              # the same Report

Modules: config (Config, presets), thinking (T_1..T_k), model (Combiner, FittedCombiners), features (the
cached training triples), fit (cross-entropy and ridge), train (train, load, train_or_load), bpb (the
evaluators), evaluate (evaluate, run), explore (the app's and notebook's live knobs), cli.
"""

from lab.combiner.config import Config
from lab.combiner.evaluate import evaluate, run
from lab.combiner.model import Combiner, FittedCombiners, build, combined_logits
from lab.combiner.thinking import Thoughts, think, think_every_position
from lab.combiner.train import load, train, train_or_load

__all__ = ["Config", "Combiner", "FittedCombiners", "Thoughts", "build", "combined_logits", "evaluate", "load", "run",
           "think", "think_every_position", "train", "train_or_load"]
