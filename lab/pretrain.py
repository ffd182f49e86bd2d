"""Pretraining the lab's own tiny bases on the lab corpus, and their held-out loss against the unigram floor.

    pretrain("tiny-gpt2")          # resumable; progress bar; writes models/tiny-gpt2/
    base = ensure_base("smoke-gpt2")   # load it, pretraining it first if it is not on disk
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from lab import LabError
from lab.bases import LAB_META, PRESETS, Base, BasePreset, default_device, load_base, preset_path, suggest
from lab.corpus import corpus_tokens, load_tokenizer, token_windows
from lab.stats import bootstrap_ci, mean_with_ci, paired_delta
from lab.store import atomic_dir, check_replaceable, environment, write_json
from lab.trainer import TrainSpec, fit


def ensure_base(name: str, **load_kw) -> Base:
    """The one base-loading policy of every pipeline: a lab preset that is not on disk yet is pretrained first
    (with progress, resumable); any other name or folder loads as it is (`lab.bases.load_base`)."""
    if name in PRESETS and not (preset_path(name) / "config.json").exists():
        pretrain(name)
    return load_base(name, **load_kw)


def _unigram_logp(train: np.ndarray, vocab: int) -> np.ndarray:
    """log p of the add-one-smoothed training unigram, per token id."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of the add-one-smoothed training unigram: the floor to beat."""
    return float(-_unigram_logp(train, vocab)[heldout.astype(np.int64)].mean())


def heldout_window_losses(model, heldout: np.ndarray, seq_len: int, n_windows: int = 64,
                          batch: int = 16) -> np.ndarray:
    """Mean next-token loss (nats) of each of the first `n_windows` fixed, non-overlapping held-out windows:
    the unit a CI resamples."""
    n = min(n_windows, (len(heldout) - 1) // seq_len)
    offsets = np.arange(n) * seq_len
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            x = token_windows(heldout, offsets[i: i + batch], seq_len).to(model.device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            out.append(nll.mean(1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def heldout_loss(model, heldout: np.ndarray, seq_len: int, n_windows: int = 64, batch: int = 16) -> float:
    """Mean next-token loss over fixed, non-overlapping held-out windows (all windows have seq_len targets)."""
    return float(heldout_window_losses(model, heldout, seq_len, n_windows, batch).mean())


def unigram_window_losses(train: np.ndarray, heldout: np.ndarray, vocab: int, seq_len: int,
                          n_windows: int) -> np.ndarray:
    """The add-one-smoothed training unigram's loss on the same windows' targets as `heldout_window_losses`."""
    logp = _unigram_logp(train, vocab)
    n = min(n_windows, (len(heldout) - 1) // seq_len)
    targets = np.stack([heldout[o + 1: o + seq_len + 1].astype(np.int64) for o in np.arange(n) * seq_len])
    return -logp[targets].mean(1)


def preset_streams(p: BasePreset, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A preset's pretraining token streams: (train, held-out)."""
    return (corpus_tokens(tokenizer, "train", p.n_train_docs),
            corpus_tokens(tokenizer, "heldout", max(500, p.n_train_docs // 20), guard_docs=p.n_train_docs))


def heldout_comparison(name: str, n_windows: int = 128) -> dict:
    """A preset base's held-out loss with a bootstrap CI over windows, and paired against the training
    unigram on the same tokens (the floor a language model must beat): {"loss": Measure, "vs_unigram": Measure}."""
    if name not in PRESETS:
        raise LabError(f"unknown preset {name!r}{suggest(name, PRESETS)}; presets are: {', '.join(PRESETS)}")
    p = PRESETS[name]
    base = load_base(name)
    tokenizer = load_tokenizer()
    train, held = preset_streams(p, tokenizer)
    model_w = heldout_window_losses(base.model, held, p.seq_len, n_windows)
    uni_w = unigram_window_losses(train, held, len(tokenizer), p.seq_len, n_windows)
    unit = f"{len(model_w)} held-out windows of {p.seq_len} tokens"
    loss = mean_with_ci(f"{name} held-out loss (nats/token)", model_w)
    loss.extra["unit"] = unit
    diff = paired_delta(f"{name} held-out loss minus the unigram's", model_w, uni_w, "add-one training unigram")
    diff.extra["unit"] = unit
    return {"loss": loss, "vs_unigram": diff}


def pretrain(name: str, steps: int | None = None, seed: int | None = None, stop_after: int | None = None,
             out_dir: Path | None = None) -> dict:
    """Pretrain a preset base on the lab corpus; resumable from its checkpoint. Returns its metrics."""
    if name not in PRESETS:
        raise LabError(f"unknown preset {name!r}{suggest(name, PRESETS)}; presets are: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise LabError(f"steps must be a whole number >= 1 (leave it out for the preset's {p.steps}), got {steps!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise LabError(f"seed must be a whole number in [0, 2**32) (leave it out for the preset's {p.seed}), got {seed!r}")
    steps = p.steps if steps is None else steps
    out_dir = Path(out_dir) if out_dir else preset_path(name)
    # only a lab base may be replaced: a user's folder (or a file) at the output path is refused before training
    check_replaceable(out_dir, kind="base")
    state = PartialState()  # under `accelerate launch`: one process builds shared files, one saves
    with state.main_process_first():
        tokenizer = load_tokenizer()
        train, held = preset_streams(p, tokenizer)
    vocab = len(tokenizer)
    torch.manual_seed(p.seed if seed is None else seed)
    model = AutoModelForCausalLM.from_config(p.hf_config(vocab, tokenizer))
    spec = TrainSpec(steps=steps, lr=p.lr, warmup=min(100, steps // 10), seed=p.seed if seed is None else seed,
                     ckpt_every=max(50, steps // 10), eval_every=max(20, steps // 5))

    def batch_fn(step: int, rank: int, world: int) -> dict:
        rng = np.random.default_rng([spec.seed, step, rank])
        offsets = rng.integers(0, len(train) - p.seq_len - 1, size=p.batch_size // world)
        return {"ids": token_windows(train, offsets, p.seq_len)}

    def loss_fn(m, batch):
        x = batch["ids"]
        logits = m(input_ids=x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())

    def eval_fn(m):
        return {"heldout_loss": heldout_loss(m, held, p.seq_len, n_windows=32)}

    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    result = fit(model, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn, desc=f"pretrain {name}", device=default_device(),
                 stop_after=stop_after)
    if stop_after is not None and stop_after < spec.steps:
        return {"stopped_at": stop_after}
    if not state.is_main_process:
        return {}
    windows = heldout_window_losses(model, held, p.seq_len, n_windows=128)
    vs = paired_delta("held-out loss minus the unigram's", windows,
                      unigram_window_losses(train, held, vocab, p.seq_len, 128), "add-one training unigram")
    metrics = {
        "preset": asdict(p), "steps": spec.steps, "seconds": round(result.seconds, 1),
        "heldout_loss": float(windows.mean()), "heldout_loss_ci95": list(bootstrap_ci(windows)),
        "heldout_windows": len(windows),
        "unigram_loss": unigram_loss(train, held, vocab),
        # the same windows' targets under the unigram, paired: the floor the base must beat, with its test
        "vs_unigram": {"delta": vs.value, "ci95": [vs.ci_low, vs.ci_high], "unigram_loss": vs.control_value,
                       "p_value": vs.p_value, "test": vs.test, "n": vs.n},
        "heldout_tokens": int(min(128, (len(held) - 1) // p.seq_len) * p.seq_len),
        "train_tokens": int(len(train)), "history": result.history,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment(),
    }
    with atomic_dir(out_dir, kind="base") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / LAB_META, metrics)
    shutil.rmtree(ckpt, ignore_errors=True)  # the finished model supersedes its checkpoint
    return metrics


def _safe_text(fn):
    """A row's text, or "-" when its metadata is malformed (a hand-edited lab_base.json never breaks a listing)."""
    def text(row: dict) -> str:
        try:
            return fn(row)
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            return "- (unreadable metadata)"
    text.__doc__, text.__name__ = fn.__doc__, fn.__name__
    return text


@_safe_text
def loss_text(row: dict) -> str:
    """A `list_bases` row's held-out loss as the lab shows it: value [95% CI] and n, or "-"."""
    if row.get("heldout_loss") is None:
        return "-"
    ci, n = row.get("heldout_loss_ci95"), row.get("heldout_windows")
    return (f"{row['heldout_loss']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + (f" (n = {n} windows)" if n else ""))


@_safe_text
def vs_unigram_text(row: dict) -> str:
    """A `list_bases` row's paired comparison with the unigram: delta [95% CI], p, or what is known."""
    vs = row.get("vs_unigram")
    if vs:
        test = f" ({vs['test']})" if vs.get("test") else ""
        return f"{vs['delta']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], p = {vs['p_value']:.2g}{test}"
    if row.get("unigram_loss") is not None:  # an older base: the unigram's loss, not yet paired
        return f"unigram {row['unigram_loss']:.3f} (unpaired)"
    return "-"
