"""Thinking combiner: one (or k) Coconut-style latent steps on a frozen base, mixed linearly into the
final-normed state, h' = (1 + alpha) h + M T_k + beta (identity at zero init), measured in bits per byte.

    from lab.combiner import Config, train, evaluate
    cfg = Config.preset("tiny"); base = load_base(cfg.base)
    art = train(cfg, base); report = evaluate(art, base)
"""

from lab.combiner.combiner import Combiner, combined_logits
from lab.combiner.experiment import (FITS, Config, artifact_dir, build, combiners, control_combiner, delta_table, eval_features,
                                     evaluate, load, reproduce_section, train, train_or_load)
from lab.combiner.thinking import Thoughts, think, think_every_position

__all__ = ["Combiner", "combined_logits", "Config", "FITS", "artifact_dir", "build", "combiners", "control_combiner", "delta_table",
           "eval_features", "evaluate", "load", "reproduce_section", "train", "train_or_load", "think", "think_every_position",
           "Thoughts"]
