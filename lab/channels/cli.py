"""`lab train channels` / `lab evaluate channels`: thin wrappers over lab.channels."""

from __future__ import annotations

from pathlib import Path

import typer

from lab import results_dir
from lab.channels.config import Config
from lab.channels.evaluate import run, write_lexicons
from lab.channels.train import artifact_root, train_controls, train_or_load

# the options that pick the config, shared by both commands (evaluate finds what train trained by the same config)
_PRESET = typer.Option("tiny", help="smoke (seconds), quick (the main job's size), tiny (CPU minutes) or paper (GPU)")
_BASE = typer.Option(None, help="base to adapt (default: the preset's, e.g. tiny-gpt2)")
_MODE = typer.Option(None, help="additive (default) or xattn (multi-token cross-attention)")
_STEPS = typer.Option(None, help="override the adapter's training steps")
_SEED = typer.Option(0, help="training seed; the native track trains seeds seed .. seed + native_seeds - 1")
_NATIVE = typer.Option(True, help="also the native track (3 small models from scratch)")
_TEXT_ARM = typer.Option(True, help="also the equally-trained text arm")


def _config(preset: str, base: str | None, mode: str | None, steps: int | None, seed: int, native: bool,
            text_arm: bool) -> Config:
    return Config.preset(preset, base=base, mode=mode, steps=steps, seed=seed, native=native, train_text_arm=text_arm)


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("channels")
    def train_channels(preset: str = _PRESET, base: str = _BASE, mode: str = _MODE, steps: int = _STEPS,
                       seed: int = _SEED, native: bool = _NATIVE, text_arm: bool = _TEXT_ARM,
                       force: bool = typer.Option(False, help="retrain even if the artifact exists")):
        """Train the channel injection on a frozen base (+ text arm, + native track)."""
        cfg = _config(preset, base, mode, steps, seed, native, text_arm)
        b = cfg.load_base()
        model = train_or_load(cfg, b, force=force)
        controls = train_controls(cfg, b, force=force)
        m = model.artifact.manifest["metrics"]
        last = m["history"][-1] if m.get("history") else {}
        typer.echo(f"adapter: {model.artifact.path}  ({m['n_params']} params, {m['seconds']:.0f} s, "
                   f"val loss {last.get('val_loss', float('nan')):.3f}, max|alpha| {last.get('max|alpha|', 0):.3f})")
        if controls.text is not None:
            t = controls.text.manifest["metrics"]
            typer.echo(f"text arm: {controls.text.path}  (LoRA rank {t.get('lora_rank')}, {t['n_params']} params "
                       f"against the injector's {t.get('channel_arm_params')}, {t['seconds']:.0f} s)")
        for adapter, text in controls.seeds or []:
            typer.echo(f"adapter seed {adapter.config['seed']}: {adapter.path}" + (f"  text arm: {text.path}" if text else ""))
        for mode, adapter in (controls.modes or {}).items():
            typer.echo(f"adapter ({mode}): {adapter.path}")
        for run_dirs in controls.native or []:  # one {model: dir} per training seed
            for k, p in run_dirs.items():
                typer.echo(f"native {k}: {p}")

    @evaluate_app.command("channels")
    def evaluate_channels(preset: str = _PRESET, base: str = _BASE, mode: str = _MODE, steps: int = _STEPS,
                          seed: int = _SEED, native: bool = _NATIVE, text_arm: bool = _TEXT_ARM,
                          out: Path = typer.Option(None, help="report directory (default: results/channels-<preset>-<base>)"),
                          attribution: bool = typer.Option(True, help="captum attributions (slower)")):
        """Held-out, judge-free report (training what is missing first): n, rate, control and McNemar p per
        capability; writes report.md."""
        cfg = _config(preset, base, mode, steps, seed, native, text_arm)
        b = cfg.load_base()
        rep = run(cfg, b, attribution=attribution)
        out = out or results_dir() / artifact_root(cfg, b.name).name
        rep.save(out)
        write_lexicons(out)
        typer.echo(f"report: {out / 'report.md'}")
