"""One seeded, resumable training loop on `accelerate.Accelerator`, shared by every experiment.

Resumability is exact: batches are a pure function of (seed, step, rank) and of a `train_state` that
is checkpointed with everything else (e.g. an adaptive curriculum), the model's trainable
tensors go to safetensors, the optimizer/scheduler state to a tensors-only file read back with
`torch.load(weights_only=True)`, so a run killed at any point and resumed ends with the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lab import LabError
from lab.store import atomic_dir, load_safetensors, read_json, write_json

MAX_LR = 10.0  # above this no optimiser step of the lab's is meaningful: a typo (1e308), not a setting


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainSpec:
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50            # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # max gradient norm (> 0); 0 or None: no clipping
    seed: int = 0
    ckpt_every: int = 200       # steps between resumable checkpoints (0: only at the end)
    config_hash: str = ""       # the experiment config's hash: a checkpoint of another config is never resumed
    eval_every: int = 200       # steps between held-out evaluations (0: only at the end)

    def __post_init__(self):
        """Every value a training step needs, checked here, naming the field: not a traceback mid-training."""
        if not _is_int(self.steps) or self.steps < 1:
            raise LabError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not _is_num(self.lr) or not 0 < self.lr <= MAX_LR:
            raise LabError(f"lr must be a finite number in (0, {MAX_LR:g}], got {self.lr!r}")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise LabError(f"warmup must be a whole number >= 0, got {self.warmup!r}")
        if not _is_num(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise LabError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise LabError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip < 0):
            raise LabError(f"grad_clip must be a finite number > 0 (the largest gradient norm), or 0 / None for no "
                           f"clipping, got {self.grad_clip!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise LabError(f"seed must be a whole number in [0, 2**32), got {self.seed!r}")
        for k in ("ckpt_every", "eval_every"):
            if not _is_int(getattr(self, k)) or getattr(self, k) < 0:
                raise LabError(f"{k} must be a whole number >= 0, got {getattr(self, k)!r}")


class Diverged(LabError):
    """Training produced a non-finite loss or parameter: nothing was saved from it."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # one row per eval: step, loss, metrics, seconds
    seconds: float = 0.0
    resumed_from: int = 0
    stopped_early: bool = False  # stop_when ended the run before spec.steps
    running_loss: float | None = None  # the training loss's running average (checkpointed: a resumed curve is exact)

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def _lr_lambda(spec: TrainSpec):
    def f(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fit(
    model: torch.nn.Module,
    batch_fn: Callable[[int, int, int], dict],
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    spec: TrainSpec,
    ckpt_dir: Path | None = None,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    desc: str = "train",
    stop_after: int | None = None,
    train_state=None,
    stop_when: Callable[[dict], bool] | None = None,
    device: torch.device | str | None = None,
    no_decay: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model's `requires_grad` parameters.

    batch_fn(step, rank, world_size) -> batch dict (deterministic); loss_fn(model, batch) -> scalar;
    eval_fn(model) -> dict of held-out metrics shown on the progress bar and kept in history.
    stop_after: stop (after checkpointing) at this step, as if killed; for resume tests.
    progress: show the progress bar (tqdm).
    train_state: an object with state_dict() -> JSON-able dict and load_state_dict(d) whose state batch_fn or
    loss_fn change as training goes (e.g. an adaptive curriculum); checkpointed with the weights, so a
    resumed run continues exactly.
    stop_when(metrics) -> bool: after an evaluation, stop (after checkpointing) if it returns True; for
    time-to-accuracy measurements, which need not train past the target (result.stopped_early says so).
    device: where training runs, i.e. where the frozen base is (`base.device`): the trainable module and every
    batch are moved there. Default: the device of the model's first parameter.
    no_decay(name) -> bool: the trainable parameters (by name) that AdamW must not decay; they go in a second
    parameter group with weight decay 0 (e.g. gates, biases, norms). None: one group, every tensor decays.
    """
    set_seed(spec.seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # one device for the base, the trainable module and the batches; accelerate picks the GPU of this process
    accelerator = Accelerator(cpu=device.type == "cpu")
    named = _trainable(model)
    params, param_names = list(named.values()), list(named)
    if not params:
        raise LabError("the model has no trainable parameters")
    if no_decay is None:
        groups = params
    else:
        keep = [p for n, p in named.items() if not no_decay(n)]
        free = [p for n, p in named.items() if no_decay(n)]
        groups = [g for g in ({"params": keep, "weight_decay": spec.weight_decay},
                              {"params": free, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec))
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)

    result = TrainResult(steps=spec.steps)
    start = 0
    if ckpt_dir is not None and (Path(ckpt_dir) / "trainer.json").exists():
        start = _load_checkpoint(Path(ckpt_dir), raw, opt, sched, result, spec, train_state)
        result.resumed_from = start

    t0 = time.perf_counter() - result.seconds
    bar = tqdm(range(start, spec.steps), desc=desc, initial=start, total=spec.steps,
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    running = result.running_loss
    # time inside eval_fn, cumulative, so a time-to-accuracy can be read with and without the measuring itself
    eval_total = result.history[-1].get("eval_seconds", 0.0) if result.history else 0.0
    model.train()
    for step in bar:
        batch = batch_fn(step, accelerator.process_index, accelerator.num_processes)
        batch = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss = loss_fn(model, batch)
        lv = loss.detach().float().item()
        if not math.isfinite(lv):
            raise _diverged(desc, step + 1, f"the training loss is {lv}", spec, ckpt_dir)
        accelerator.backward(loss)
        if spec.grad_clip:
            accelerator.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bad = _non_finite(params, param_names)
        if bad:
            raise _diverged(desc, step + 1, f"parameter {bad} holds NaN or inf after the update", spec, ckpt_dir)
        running = lv if running is None else 0.95 * running + 0.05 * lv
        done = step + 1
        post = {"loss": f"{running:.3f}"}
        is_last = done == spec.steps
        if eval_fn is not None and (is_last or (spec.eval_every and done % spec.eval_every == 0)):
            model.eval()
            te = time.perf_counter()
            with torch.no_grad():
                metrics = eval_fn(raw)
            eval_total += time.perf_counter() - te
            model.train()
            result.history.append({"step": done, "loss": running, "seconds": time.perf_counter() - t0,
                                   "eval_seconds": eval_total, **metrics})
            post.update({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()})
            result.stopped_early = bool(stop_when is not None and not is_last and stop_when(metrics))
        bar.set_postfix(post)
        result.running_loss = running
        result.seconds = time.perf_counter() - t0
        if ckpt_dir is not None and accelerator.is_main_process and (
                is_last or (spec.ckpt_every and done % spec.ckpt_every == 0) or done == stop_after
                or result.stopped_early):
            _save_checkpoint(Path(ckpt_dir), raw, opt, sched, done, result, spec, train_state)
        if (stop_after is not None and done >= stop_after) or result.stopped_early:
            break
    bar.close()
    model.eval()
    accelerator.wait_for_everyone()
    return result


def _non_finite(params, names) -> str | None:
    """The name of the first parameter with a NaN or inf, or None (one check for all of them)."""
    with torch.no_grad():
        if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return None
        return next(n for n, p in zip(names, params) if not bool(torch.isfinite(p).all()))


def _diverged(desc: str, step: int, what: str, spec: TrainSpec, ckpt_dir) -> Diverged:
    kept = (f" The last checkpoint (finite weights, in {ckpt_dir}) is kept; delete it to start over with another "
            f"learning rate." if ckpt_dir is not None and (Path(ckpt_dir) / "trainer.json").exists() else "")
    return Diverged(f"{desc}: training diverged at step {step}: {what}. Nothing was saved. Try a lower learning "
                    f"rate than lr={spec.lr:g} (or a smaller grad_clip).{kept}")


def _save_checkpoint(ckpt_dir: Path, model, opt, sched, step, result: TrainResult, spec: TrainSpec, train_state=None):
    with atomic_dir(ckpt_dir) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        write_json(tmp / "trainer.json", {"step": step, "spec": asdict(spec), "seconds": result.seconds,
                                          "history": result.history, "running_loss": result.running_loss,
                                          "state": train_state.state_dict() if train_state is not None else None})


def _load_checkpoint(ckpt_dir: Path, model, opt, sched, result: TrainResult, spec: TrainSpec, train_state=None) -> int:
    meta = read_json(ckpt_dir / "trainer.json")
    if meta["spec"] != asdict(spec):
        # the same shapes can hide another config (e.g. where the loop starts): never resume across configs
        raise LabError(f"checkpoint in {ckpt_dir} was made with another training spec or config "
                       f"({meta['spec']} vs {asdict(spec)}); delete it or use the same settings")
    tensors = load_safetensors(ckpt_dir / "trainable.safetensors")
    own = _trainable(model)
    if set(tensors) != set(own):
        raise LabError(f"checkpoint in {ckpt_dir} holds other parameters than this model")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(tensors[n])
    try:
        # map to CPU: a checkpoint written on a GPU host resumes anywhere (load_state_dict recasts to the params)
        state = torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated file: say which, do not guess
        raise LabError(f"{ckpt_dir / 'optimizer.pt'} is unreadable (corrupt or truncated): {e}") from None
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if train_state is not None:
        if meta.get("state") is None:
            raise LabError(f"checkpoint in {ckpt_dir} has no training state (curriculum) to resume from")
        train_state.load_state_dict(meta["state"])
    result.history = meta["history"]
    result.seconds = meta["seconds"]
    result.running_loss = meta.get("running_loss")
    return int(meta["step"])
