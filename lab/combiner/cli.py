"""`lab train combiner` / `lab evaluate combiner`: thin wrappers over lab.combiner."""

from __future__ import annotations

from pathlib import Path

import typer

from lab import results_dir
from lab.combiner.config import KIND, Config
from lab.combiner.evaluate import evaluate, run
from lab.combiner.train import load, train
from lab.config import PRESET_HELP
from lab.store import load_artifact


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("combiner")
    def train_cmd(preset: str = typer.Option("tiny", help=PRESET_HELP),
                  base: str = typer.Option(None, help="override the preset's base (preset name or HF path)"),
                  seed: int = typer.Option(0, help="seed for features and fits"),
                  k_max: int = typer.Option(None, help="fit combiners for k = 1..k_max latent steps (<= 4)"),
                  ce_lr: float = typer.Option(None, help="override the CE fit's learning rate (published: 1e-3)"),
                  ce_steps: int = typer.Option(None, help="override the CE fit's steps (published: 80)"),
                  out: Path = typer.Option(None, help="artifact directory (default models/combiner-<preset>-<base>)")):
        """Cache (h, T_1..T_k, next token) features and fit the combiner by cross-entropy and ridge."""
        cfg = Config.preset(preset, base=base, seed=seed, k_max=k_max, ce_lr=ce_lr, ce_steps=ce_steps)
        b = cfg.load_base()
        model = load(train(cfg, b, out_dir=out), b)
        for row in model.fit_table():
            typer.echo(f"k{row['k']}: base val {row['base val nats']:.4f} nats | ce {row['ce val nats']:.4f} | "
                       f"ridge {row['ridge val nats']:.4f} (lambda {row['ridge lambda']:g}, step {row['ridge step']:.3g})")
        ctrl = model.fits["control"]
        typer.echo(f"no-thought control: val {ctrl['val_nats']:.4f} nats (base {ctrl['val_nats_base']:.4f})")
        typer.echo(f"artifact: {model.artifact.path}")

    @evaluate_app.command("combiner")
    def evaluate_cmd(preset: str = typer.Option("tiny", help=PRESET_HELP),
                     seed: int = typer.Option(0, help="seed for features, fits and CIs"),
                     artifact: Path = typer.Option(None, help="evaluate this trained artifact (default: the preset's, "
                                                              "fitted first if missing)"),
                     out: Path = typer.Option(None, help="report directory (default results/combiner-<preset>)"),
                     formats: str = typer.Option("png,html", help="figure formats, comma-separated")):
        """Bits per byte on held-out text: sliding window (base), chunked base / identity / fitted, delta vs k."""
        if artifact is None:
            rep = run(Config.preset(preset, seed=seed))
        else:
            art = load_artifact(artifact, KIND)
            rep = evaluate(load(art, Config.from_dict(art.config).load_base()))
        for m in rep.measures:
            typer.echo(str(m))
        dest = rep.save(out or results_dir() / f"combiner-{preset}", formats=[f for f in formats.split(",") if f])
        typer.echo(f"report: {dest / 'report.md'}")
