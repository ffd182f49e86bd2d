"""`lab train channels` / `lab evaluate channels`: thin wrappers over lab.channels."""

from __future__ import annotations

from pathlib import Path

import typer


def _config(preset: str, base: str | None, mode: str | None, steps: int | None, seed: int):
    from lab.channels import Config
    over = {"seed": seed}
    if base:
        over["base"] = base
    if mode:
        over["mode"] = mode
    if steps:
        over["steps"] = steps
    return Config.preset(preset, **over)


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("channels")
    def train_channels(
        base: str = typer.Option(None, help="base to adapt (default: the preset's, e.g. tiny-gpt2)"),
        preset: str = typer.Option("tiny", help="smoke (seconds), tiny (CPU minutes) or paper (GPU)"),
        mode: str = typer.Option(None, help="additive (default) or xattn (multi-token cross-attention)"),
        steps: int = typer.Option(None, help="override the adapter's training steps"),
        seed: int = typer.Option(0, help="training seed; the native track trains seeds seed .. seed + native_seeds - 1"),
        native: bool = typer.Option(True, help="also train the native track (3 small models from scratch)"),
        text_arm: bool = typer.Option(True, help="also train the equally-trained text arm"),
        force: bool = typer.Option(False, help="retrain even if the artifact exists"),
    ):
        """Train the channel injection on a frozen base (+ text arm, + native track)."""
        from lab.pretrain import ensure_base
        from lab.channels import train_all
        cfg = _config(preset, base, mode, steps, seed)
        cfg.train_text_arm = text_arm
        b = ensure_base(cfg.base)
        arts = train_all(cfg, b, force=force, native=native)
        m = arts["adapter"].manifest["metrics"]
        last = m["history"][-1] if m.get("history") else {}
        typer.echo(f"adapter: {arts['adapter'].path}  ({m['n_params']} params, {m['seconds']:.0f} s, "
                   f"val loss {last.get('val_loss', float('nan')):.3f}, max|alpha| {last.get('max|alpha|', 0):.3f})")
        if "text" in arts:
            t = arts["text"].manifest["metrics"]
            typer.echo(f"text arm: {arts['text'].path}  (LoRA rank {t.get('lora_rank')}, {t['n_params']} params "
                       f"against the injector's {t.get('channel_arm_params')}, {t['seconds']:.0f} s)")
        for run in arts.get("native", []):  # one {model: dir} per training seed
            for k, p in run.items():
                typer.echo(f"native {k}: {p}")

    @evaluate_app.command("channels")
    def evaluate_channels(
        base: str = typer.Option(None, help="base the adapter was trained on (default: the preset's)"),
        preset: str = typer.Option("tiny", help="which preset's artifacts to evaluate"),
        mode: str = typer.Option(None, help="additive or xattn (must match training)"),
        seed: int = typer.Option(0, help="seed of the adapter and held-out draw; the native seeds from it, as trained"),
        out: Path = typer.Option(None, help="report directory (default: results/channels-<preset>-<base>)"),
        attribution: bool = typer.Option(True, help="captum attributions (slower)"),
    ):
        """Held-out, judge-free report: n, rate, control and McNemar p per capability; writes report.md."""
        from lab import results_dir
        from lab.bases import load_base
        from lab.channels import evaluate, write_lexicons
        from lab.channels.train import artifact_root, native_runs_on_disk
        cfg = _config(preset, base, mode, None, seed)
        b = load_base(cfg.base)
        root = artifact_root(cfg, b.name)
        text = root / "text-arm"
        native = native_runs_on_disk(cfg, b, log=typer.echo)  # every seed's, with this base's text encoder, or None
        out = out or results_dir() / root.name
        rep = evaluate(root / "adapter", b, text_artifact=text if (text / "manifest.json").exists() else None,
                       native_runs=native, attribution=attribution, log=typer.echo)
        rep.save(out)
        write_lexicons(out)
        typer.echo(f"report: {out / 'report.md'}")
