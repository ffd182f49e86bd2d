"""The RLF experiment config: one dataclass, named presets, saved as JSON beside every artifact."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lab import LabError
from lab.config import ExperimentConfig

CORES = ("transformer", "mamba2")
# "standard": the lab's loop of a small core over the frozen base's stream; "paper": the published Mamba2 loop
# (the base's upper blocks re-run with LoRA inside every loop, then the core, then the loop norm; head trainable)
LOOPS = ("standard", "paper")
# which trainable tensors AdamW decays: "matrices" (not the gate, biases, norms: every 1-d tensor is spared, as the
# published run spares its gate), "all" (one group, every tensor decays), "lora" (only LoRA matrices, as the
# published Mamba2 script: its gate, core, loop norm and head sit in zero-decay groups)
DECAY = ("matrices", "all", "lora")
SUPERVISION = ("every_loop", "answer_only")
HOP_SAMPLING = ("newest", "error")
# sizes of what `run` adds around the trained method (control runs, probes): read only after training, so
# they never change a run's identity (its config.json, checkpoint hash, or whether an artifact counts as stale)
PIPELINE_FIELDS = ("baseline_runs", "null_runs", "probe_n", "probe_attr_n", "probe_umap", "method_seeds")
# fields that change what is measured or logged, not what is trained
EVALUATION_FIELDS = ("eval_every", "ckpt_every", "val_n_per_hop", "infer_cap", "test_n", "test_max_hops",
                     *PIPELINE_FIELDS)
# what a baseline or control run may change against the method (its switch, and the seed)
VARIANT_FIELDS = ("lifeline", "loop_rope", "supervision", "shuffle_supervision", "seed")
# the baselines every report carries: name -> its switch (same base, core, data, steps and seed as the method)
BASELINES = {"no lifeline": {"lifeline": False}, "no loop-RoPE": {"loop_rope": False},
             "answer-only supervision": {"supervision": "answer_only"}}
# the control runs behind the null-calibrated gate rule: the method's recipe with shuffled supervision
NULL_CONTROL = {"shuffle_supervision": True}


@dataclass
class Config(ExperimentConfig):
    MECHANISM: ClassVar[str] = "rlf"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: tests and CI notebooks on the smoke base (numbers are meaningless, shapes are real)
        "smoke": dict(base="smoke-gpt2", steps=30, batch_size=16, d_core=64, eval_every=15, ckpt_every=15,
                      val_n_per_hop=8, test_n=24, test_max_hops=6, infer_cap=8, max_train_hops=3,
                      probe_n=24, probe_attr_n=6, probe_umap=False, method_seeds=1),
        # the CPU experiment: tiny-gpt2, <= 10 min to 99% validation accuracy (sweep: `python bench/bench_rlf.py
        # --to-target --seeds=0,1,2`). base_blocks=0, a departure from the published setup (the report says so):
        # a 4-layer base's deep states carry a confident wrong prediction the core must first out-grow
        # (`python bench/bench_rlf.py --start-sweep`).
        "tiny": dict(base="tiny-gpt2", d_core=192, n_heads=8, ff_mult=2, lr=2e-3, steps=6000, curriculum_steps=2500,
                     curriculum_threshold=0.9, hop_sampling="error", base_blocks=0, one_hop_count_per_batch=True,
                     method_seeds=3),
        # the main job (`lab reproduce --preset quick`, 15 minutes for all four mechanisms; ~360 s on 2 cores for
        # this section): the tiny recipe on the quick base with a narrower core, 1-2 hops tested to +3, one method
        # seed, the no-lifeline baseline and one null-control run
        "quick": dict(base="quick-gpt2", d_core=128, n_heads=4, ff_mult=2, lr=2e-3, steps=1100, curriculum_steps=400,
                      curriculum_threshold=0.9, hop_sampling="error", base_blocks=0, one_hop_count_per_batch=True,
                      max_train_hops=2, test_max_hops=5, test_n=150, val_n_per_hop=30, eval_every=150,
                      ckpt_every=150, baseline_runs=("no lifeline",), null_runs=1, probe_n=40, probe_attr_n=8,
                      probe_umap=False, method_seeds=1),
        # a GPU and the published GPT-2-124M base (loads when the user has it; the core ~14M parameters)
        "paper": dict(base="gpt2", d_core=768, n_heads=12, steps=2500, batch_size=32, lr=5e-4, warmup=100,
                      eval_every=250, ckpt_every=250, val_n_per_hop=200),
    }

    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "quick": "quick preset: 1-2 training hops on the quick base, one method seed, the no-lifeline baseline and one "
                 "null-control run; extrapolation is +1 to +3 hops (the tiny preset trains 1-5 hops with three seeds, "
                 "three baselines, two null runs)."}

    preset_name: str = "tiny"        # which named preset this config came from (names the artifact)
    # --- the model ---
    core: str = "transformer"        # "transformer" (2-layer causal encoder) or "mamba2" (one Mamba2 block)
    d_core: int = 0                  # core width (0: the base's d_model); wider cores learn faster
    core_layers: int = 2             # transformer core depth (the published GPT-2 core had 2)
    n_heads: int = 4                 # transformer core heads
    ff_mult: int = 4                 # transformer core MLP width multiple
    core_token_rope: bool = True     # rotary embeddings over token positions inside the core's attention
    core_conv: int = 5               # width of the short causal convolutions on q and on k (0: off)
    answer_space: str = "task"       # "task": logits masked to names + values + HALT; "full": whole vocabulary
    core_init: str = "match"         # "match": W_K = W_Q and averaging q/k convolutions at init; "random": identity
    mamba_d_state: int = 64          # Mamba2 core: published d_state 64, expand 2, head dim 64
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_conv: int = 4              # Mamba2 core's causal conv width (published: the Mamba2 default, 4)
    mamba_init: str = "published"    # Mamba2 core: "published" (standard Mamba2 init); "match": C = B lookup prior
    base_blocks: int = -1            # base blocks that encode the prompt before the loop (-1: all)
    gate_init: float = 1.0           # the lifeline gate starts at ones(d)
    loop: str = "standard"           # LOOPS: "paper" re-runs the base's upper blocks (LoRA) inside every loop (Mamba2)
    loop_norm: bool = True           # an RMSNorm ends every loop iteration (published); False: the raw state loops on
    loop_blocks: int = 0             # paper loop: the base's top blocks re-run per loop (0: all but the lowest
                                     # quarter, as published: layers 6-23 of 24)
    lora_rank: int = 8               # paper loop: LoRA rank on the re-run blocks' mixer in/out projections (published 8)
    lora_alpha: float = 0.0          # LoRA alpha (0: 2 x rank, as published)
    # --- baselines / controls (first-class config values) ---
    lifeline: bool = True            # False: the no-lifeline baseline (gate fixed at 0)
    loop_rope: bool = True           # False: the no-loop-RoPE baseline
    supervision: str = "every_loop"  # "answer_only": supervise only the value (loop hops-1) and HALT (loop hops)
    shuffle_supervision: bool = False  # control: targets taken from another problem with the same hop count
    task_version: int = 2            # lab.rlf.data.TASK_VERSION the run was trained on (1: short distractors)
    # --- training ---
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    decay: str = "matrices"          # DECAY: which trainable tensors weight decay applies to
    grad_clip: float = 1.0
    max_train_hops: int = 5          # training problems have 1..max_train_hops hops
    curriculum_steps: int = 0        # open one more hop every curriculum_steps / max_train_hops steps (0: off)
    curriculum_threshold: float = 0.0  # > 0: also open the next hop once training accuracy on the newest reaches it
    curriculum_window: int = 64      # ... over its last this many training problems
    hop_sampling: str = "newest"     # "newest": open hop counts uniform, the newest twice; "error": by training error
    one_hop_count_per_batch: bool = False  # each batch draws one hop count: it runs hops+1 loops, not the longest's
    eval_every: int = 100            # live held-out accuracy on the progress bar
    ckpt_every: int = 100
    val_n_per_hop: int = 60          # validation problems per hop for the progress bar (not the test sets)
    # --- evaluation ---
    infer_cap: int = 16              # loops at inference (runs until HALT or this cap)
    test_n: int = 500                # held-out problems per hop count in the test sets
    test_max_hops: int = 12
    # --- what `run` adds (PIPELINE_FIELDS) ---
    baseline_runs: tuple = tuple(BASELINES)  # which BASELINES `run` trains and reports beside the method
    null_runs: int = 2               # shuffled-supervision control runs for the null-calibrated gate rule
    probe_n: int = 100               # held-out problems per trained hop count for the probes
    probe_attr_n: int = 40           # problems (spread over hop counts) for the attribution test (0: off)
    probe_umap: bool = True          # also project the trajectories with UMAP (its first fit JIT-compiles, ~20 s)
    method_seeds: int = 1            # training seeds of the method (seed, seed+1, ...): across-seed mean and t interval

    def check(self) -> None:
        self.require_one_of("core", CORES)
        self.require_one_of("answer_space", ("task", "full"))
        self.require_one_of("core_init", ("match", "random"))
        self.require_one_of("mamba_init", ("published", "match"))
        self.require_positive("mamba_conv")
        self.require_one_of("supervision", SUPERVISION)
        self.require_one_of("hop_sampling", HOP_SAMPLING)
        self.require_one_of("loop", LOOPS)
        self.require_one_of("decay", DECAY)
        self.require_positive("lora_rank", "method_seeds")
        self.require_nonnegative("loop_blocks", "lora_alpha")
        if self.loop == "paper" and self.base_blocks != -1:
            raise LabError(f"{self.label()}: loop='paper' starts from the whole base pass (base_blocks=-1, as published); "
                           f"got base_blocks={self.base_blocks}")
        self.require_range("max_train_hops", 1, 12)
        self.require_range("test_max_hops", 1, 12)  # 52 names fit 12 hops plus distractors
        self.require_positive("steps", "batch_size", "infer_cap", "test_n", "val_n_per_hop", "core_layers", "n_heads",
                              "curriculum_window", "probe_n")
        self.require_range("curriculum_threshold", 0.0, 1.0)  # 0: the fixed schedule only
        self.require_nonnegative("d_core", "null_runs", "probe_attr_n")  # d_core 0: the base's width
        for name in self.baseline_runs:
            if name not in BASELINES:
                raise LabError(f"{self.label()}: baseline_runs has {name!r}; baselines are {list(BASELINES)}")

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        # configs saved before a field existed were trained without it: task version 1, no loop norm, one decay group
        return {"task_version": 1, "loop_norm": False, "decay": "all", **saved}

    @property
    def variant(self) -> str:
        """A short name for the baseline / control this config is ('full' for the method itself)."""
        parts = []
        if not self.lifeline:
            parts.append("nolifeline")
        if not self.loop_rope:
            parts.append("norope")
        if self.supervision == "answer_only":
            parts.append("answeronly")
        if self.shuffle_supervision:
            parts.append("shuffled")
        return "-".join(parts) or "full"

    def run_name(self, base_name: str | None = None) -> str:
        name = f"rlf-{self.preset_name}-{base_name or self.base}-{self.core}"
        if self.loop != "standard":
            name += f"-{self.loop}loop"
        if self.variant != "full":
            name += f"-{self.variant}"
        if self.seed != 0:
            name += f"-s{self.seed}"
        return name.replace("/", "_")

    def run_dict(self) -> dict:
        """The config as a trained run records it (config.json, checkpoint hash): every field but PIPELINE_FIELDS."""
        return {k: v for k, v in self.to_dict().items() if k not in PIPELINE_FIELDS}

    def baselines(self) -> dict[str, Config]:
        """{name: config} of the baselines the report carries (`baseline_runs` of BASELINES), trained like the method."""
        return {name: self.with_(**BASELINES[name]) for name in self.baseline_runs}

    def seed_runs(self) -> list[Config]:
        """The method trained with `method_seeds` seeds (seed, seed+1, ...); the first is the method itself."""
        return [self] + [self.with_(seed=self.seed + i) for i in range(1, self.method_seeds)]

    def null_controls(self) -> list[Config]:
        """The `null_runs` shuffled-supervision control runs (seeds seed+1, seed+2, ...)."""
        return [self.with_(**NULL_CONTROL, seed=self.seed + 1 + i) for i in range(self.null_runs)]

    def training_differences(self, other: Config, allowed: tuple[str, ...] = ()) -> dict[str, tuple]:
        """{field: (self's value, other's value)} for the fields that shape training and differ, but for
        `allowed` (e.g. a baseline's switch). Evaluation-only fields never count."""
        skip = set(EVALUATION_FIELDS) | set(allowed)
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)}


def check_comparable(method: Config, other: Config, role: str) -> None:
    """A baseline or control run must be trained like the method but for its switch (and seed): comparing a
    method against a baseline trained with another learning rate, width or curriculum measures the recipe,
    not the switch. A LabError naming every differing field otherwise."""
    diff = method.training_differences(other, allowed=VARIANT_FIELDS)
    if diff:
        listed = "; ".join(f"{k}: method {a!r}, {role} {b!r}" for k, (a, b) in diff.items())
        raise LabError(f"the {role} ({other.run_name()}) was trained with other settings than the method "
                       f"({method.run_name()}): {listed}. Train it from the method's config with only its switch "
                       f"changed (`lab train rlf --preset {method.preset_name} --variant ...`).")
