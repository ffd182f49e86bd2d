"""Inner link (ARM / RecursiveMAS): can a latent carry a reasoning state across a session boundary?

    R_in(h) = LN_post(h + W2·GELU(W1·LN_pre(h)))     trained on cached last-layer states with
    L_in = 1 − cos(R_in(h_t), Emb(y_{t+1}))           (graph-free; cache: HF datasets Arrow, memory-mapped)

Modules: adapter (R_in), cache (the Arrow state cache), training (Config, build, train, held-out cosine,
m-step rollout), handoff (the session A -> B benchmark), reconstruct (the state-reconstruction map),
experiment (evaluate, reproduce_section), cli.
"""

from lab.innerlink.adapter import InnerLink, param_count
from lab.innerlink.experiment import evaluate, reproduce_section
from lab.innerlink.training import Config, build, load, train

__all__ = ["Config", "InnerLink", "build", "evaluate", "load", "param_count", "reproduce_section", "train"]
