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
        seed: int = typer.Option(0, help="seed"),
        native: bool = typer.Option(True, help="also train the native track (3 small models from scratch)"),
        text_arm: bool = typer.Option(True, help="also train the equally-trained text arm"),
        force: bool = typer.Option(False, help="retrain even if the artifact exists"),
    ):
        """Train the channel injection on a frozen base (+ text arm, + native track)."""
        from lab.bases import load_base
        from lab.channels import train_all
        cfg = _config(preset, base, mode, steps, seed)
        cfg.train_text_arm = text_arm
        b = load_base(cfg.base, train_if_missing=preset == "smoke")
        arts = train_all(cfg, b, force=force, native=native)
        m = arts["adapter"].manifest["metrics"]
        last = m["history"][-1] if m.get("history") else {}
        typer.echo(f"adapter: {arts['adapter'].path}  ({m['n_params']} params, {m['seconds']:.0f} s, "
                   f"val loss {last.get('val_loss', float('nan')):.3f}, max|alpha| {last.get('max|alpha|', 0):.3f})")
        if "text" in arts:
            t = arts["text"].manifest["metrics"]
            typer.echo(f"text arm: {arts['text'].path}  (LoRA rank {t.get('lora_rank')}, {t['n_params']} params "
                       f"against the injector's {t.get('channel_arm_params')}, {t['seconds']:.0f} s)")
        for k, p in arts.get("native", {}).items():
            typer.echo(f"native {k}: {p}")

    @evaluate_app.command("channels")
    def evaluate_channels(
        base: str = typer.Option(None, help="base the adapter was trained on (default: the preset's)"),
        preset: str = typer.Option("tiny", help="which preset's artifacts to evaluate"),
        mode: str = typer.Option(None, help="additive or xattn (must match training)"),
        seed: int = typer.Option(0, help="seed (held-out draw)"),
        out: Path = typer.Option(None, help="report directory (default: results/channels-<preset>-<base>)"),
        attribution: bool = typer.Option(True, help="captum attributions (slower)"),
    ):
        """Held-out, judge-free report: n, rate, control and McNemar p per capability; writes report.md."""
        from lab import results_dir
        from lab.bases import load_base
        from lab.channels import evaluate, write_lexicons
        from lab.channels.train import artifact_root
        from lab.channels.model import Config
        cfg = _config(preset, base, mode, None, seed)
        b = load_base(cfg.base)
        root = artifact_root(cfg, b.name)
        text = root / "text-arm"
        from lab import models_dir
        native_root = models_dir() / f"channels-native-{cfg.preset_name}"
        native = {k: native_root / k for k in ("channels", "baseline-small", "baseline-large")}
        native = native if all((p / "manifest.json").exists() for p in native.values()) else None
        if native is not None:
            from lab.store import read_json
            if read_json(native["channels"] / "config.json").get("text_base_fingerprint") != b.fingerprint:
                native = None  # the native track was trained with another base's text encoder
        out = out or results_dir() / root.name
        rep = evaluate(root / "adapter", b, text_artifact=text if (text / "manifest.json").exists() else None,
                       native_paths=native, attribution=attribution, log=typer.echo)
        rep.save(out)
        write_lexicons(out)
        typer.echo(f"report: {out / 'report.md'}")
