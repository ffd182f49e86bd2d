"""`lab train innerlink` / `lab evaluate innerlink`: thin wrappers over lab.innerlink."""

from __future__ import annotations

from pathlib import Path

import typer

from lab import results_dir
from lab.innerlink import reconstruct
from lab.innerlink.config import Config
from lab.innerlink.evaluate import run
from lab.innerlink.train import train_or_load


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("innerlink")
    def train_innerlink(
        preset: str = typer.Option("tiny", help="smoke (seconds), quick (the main job's size), tiny (CPU minutes) or paper (GPU, real base)"),
        base: str = typer.Option(None, help="override the preset's base (a preset name, model dir or hub name)"),
        seed: int = typer.Option(0, help="seed for the adapter init, batches and controls"),
        steps: int = typer.Option(None, help="override the inner link's training steps"),
        recon: bool = typer.Option(True, help="also train the state-reconstruction hand-off map"),
    ):
        """Cache last-layer states (Arrow), fit R_in with 1 - cos, then (optionally) the reconstruction map;
        whatever is already trained for this config is kept."""
        cfg = Config.preset(preset, seed=seed, base=base, steps=steps)
        b = cfg.load_base()
        link = train_or_load(cfg, b, recon=recon)
        hist = link.artifact.manifest["metrics"]["history"]
        typer.echo(f"inner link on {b.name}: {link.n_params():,} parameters (2d²+6d at d={b.d_model}); "
                   f"held-out cos {hist[-1]['heldout_cos']:.3f} after {hist[-1]['step']} steps -> {link.artifact.path}")
        if recon:
            r = reconstruct.load_recon(reconstruct.artifact_dir(cfg.preset_name, b), b).artifact
            m = r.manifest["metrics"]
            typer.echo(f"reconstruction map: validation cos(B, A) {m['history'][-1]['val_recon_cos']:.3f} "
                       f"(inner link before training: {m['val_recon_cos_inner_link']:.3f}, n={m['val_items']} items) -> {r.path}")

    @evaluate_app.command("innerlink")
    def evaluate_innerlink(
        preset: str = typer.Option("tiny", help="which preset's artifacts to evaluate (trained first if missing)"),
        base: str = typer.Option(None, help="override the preset's base"),
        seed: int = typer.Option(0, help="seed for the artifacts, held-out items and controls"),
        items: int = typer.Option(None, help="hand-off items (default: the preset's, >= 200)"),
        out: Path = typer.Option(None, help="report directory (default: results/innerlink-<preset>)"),
    ):
        """Held-out cosine vs controls, m-step rollout, and the hand-off benchmark (all arms)."""
        rep = run(Config.preset(preset, seed=seed, base=base, handoff_items=items))
        out_dir = rep.save(out or results_dir() / f"innerlink-{preset}")
        for m in rep.measures:
            typer.echo(str(m))
        typer.echo(f"report: {out_dir / 'report.md'}")
