"""Recursive Latent Forcing: a frozen base encodes the prompt once; a small core loops over the
residual stream, re-fed the prompt through a per-dimension lifeline gate, told its loop index by
RoPE, supervised at every loop, and taught to emit HALT.

    from lab.rlf import Config, run, train_or_load
    cfg = Config.preset("tiny")                  # tiny-gpt2, transformer core
    report = run(cfg)                            # train what is missing, evaluate, probe: one Report
    model = train_or_load(cfg)                   # the RLF module (model.config, model.artifact)
"""

from lab.rlf.config import BASELINES, Config
from lab.rlf.evaluate import evaluate, run
from lab.rlf.infer import explain, solve
from lab.rlf.model import RLF, Lifeline, build
from lab.rlf.probes import probe_report
from lab.rlf.train import load, train, train_or_load

__all__ = ["Config", "BASELINES", "RLF", "Lifeline", "build", "train", "load", "train_or_load", "evaluate", "run",
           "probe_report", "explain", "solve"]
