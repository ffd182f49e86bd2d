"""Inner link (ARM / RecursiveMAS): can a latent carry a reasoning state across a session boundary?

    R_in(h) = LN_post(h + W2·GELU(W1·LN_pre(h)))     trained on cached last-layer states with
    L_in = 1 − cos(R_in(h_t), Emb(y_{t+1}))           (graph-free; cache: HF datasets Arrow, memory-mapped)

Modules: config (Config and its presets), model (R_in, build, the m-step latent rollout), cache (the Arrow
state cache), train (train, load, train_or_load), handoff (the session A -> B benchmark), reconstruct (the
state-reconstruction map), evaluate (held-out cosine, rollout, the report, `run`), cli.
"""

from lab.innerlink.config import Config
from lab.innerlink.evaluate import evaluate, run
from lab.innerlink.handoff import handoff_benchmark
from lab.innerlink.model import InnerLink, build, param_count
from lab.innerlink.reconstruct import load_recon, recon_for
from lab.innerlink.train import load, train, train_or_load

__all__ = ["Config", "InnerLink", "build", "evaluate", "handoff_benchmark", "load", "load_recon", "param_count",
           "recon_for", "run", "train", "train_or_load"]
