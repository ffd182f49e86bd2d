"""The inner-link experiment's `Config` and its presets (smoke | quick | tiny | paper).

`base` is the frozen base whose states are mapped; `seed` sets the adapter's init, the batch order,
the hand-off items and every control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lab.config import ExperimentConfig
from lab.innerlink.handoff import TASKS

# The config fields that decide the inner link itself (the rollout, hand-off and reconstruction fields do
# not): a trained link is reused when only the others change.
LINK_FIELDS = ("base", "train_docs", "heldout_docs", "cache_seed", "max_tokens", "steps", "batch_size", "lr",
               "warmup", "seed", "eval_rows")


@dataclass
class Config(ExperimentConfig):
    MECHANISM: ClassVar[str] = "innerlink"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: tests and CI notebooks
        "smoke": dict(base="smoke-gpt2", train_docs=300, heldout_docs=60, steps=80, batch_size=128, warmup=10,
                      eval_rows=1024, rollout_prompts=40, handoff_items=200, recon_steps=30, recon_batch=8),
        # the main job: the tiny experiment on the quick base, with a shorter cache and reconstruction fit
        "quick": dict(base="quick-gpt2", train_docs=3000, steps=1000, rollout_prompts=150, handoff_items=200,
                      recon_steps=150),
        # the CPU experiment (minutes)
        "tiny": dict(),
        # ARM's setting: a GPU and a real HF base (not runnable on this machine)
        "paper": dict(base="Qwen/Qwen2.5-14B-Instruct", train_docs=8078, max_tokens=256, steps=3000, batch_size=256,
                      lr=1e-4, handoff_items=500, recon_steps=3000),
    }

    # --- state cache (Arrow, memory-mapped) ---
    train_docs: int = 6000           # corpus 'train' documents whose states are cached
    heldout_docs: int = 300          # corpus 'heldout' documents for the held-out cosine
    cache_seed: int = 1234           # corpus seed
    max_tokens: int = 128            # tokens per document kept
    # --- inner-link training: L_in = 1 - cos(R_in(h_t), Emb(y_{t+1})) ---
    steps: int = 1500
    batch_size: int = 256            # cached (h_t, y_{t+1}) rows per step
    lr: float = 1e-3
    warmup: int = 100
    eval_rows: int = 4096            # held-out rows scored on the progress bar
    # --- m-step latent rollout (R_in output appended as the next input embedding) ---
    rollout_steps: int = 4           # m
    rollout_prefix: int = 16         # tokens of a held-out document before the rollout starts
    rollout_prompts: int = 200       # held-out documents rolled out
    # --- hand-off benchmark (lab.innerlink.handoff) ---
    # the main task: "persona_state" (whose story, A handing off before the question: the answer is a state,
    # never A's next token), "persona" (the same, handing off where the name is A's next token) or "pointer";
    # the report runs all three, the main task with the reconstruction maps
    handoff_task: str = "persona_state"
    handoff_items: int = 300         # held-out items (>= 200)
    handoff_hops: tuple = (1, 1)     # pointer task: hops per item (inclusive range); one hop, one distractor chain:
    handoff_distractors: tuple = (1, 1)  # the shortest lookup, where session A itself has a chance on a tiny base
    handoff_steps: int = 4           # latents A hands over (m rollout steps)
    # --- state-reconstruction hand-off map (lab.innerlink.reconstruct) ---
    recon_steps: int = 300           # (each step backpropagates through m+1 base forwards: ~1-3 s on a busy CPU)
    recon_batch: int = 16            # training items per step (disjoint from the held-out items)
    recon_lr: float = 5e-4
    open_set_recon: bool = True      # also a map trained on 9 personas' items, tested on the other 9's (persona tasks)

    def check(self) -> None:
        self.require_one_of("handoff_task", TASKS)
        self.require_positive("train_docs", "heldout_docs", "max_tokens", "steps", "batch_size", "eval_rows",
                              "rollout_steps", "rollout_prompts", "handoff_items", "handoff_steps", "recon_steps",
                              "recon_batch", "lr", "recon_lr")

    def matches(self, saved: dict, fields: tuple[str, ...] | None = None) -> bool:
        """Whether a saved config.json dict is this config (on `fields` only, if given). The preset name
        only names the artifact's folder, so it never makes a trained artifact stale."""
        want = self.to_dict()
        names = [f for f in (fields or want) if f != "preset_name"]
        return isinstance(saved, dict) and all(saved.get(f) == want[f] for f in names)
