"""`lab train combiner` / `lab evaluate combiner`: thin wrappers over lab.combiner."""

from __future__ import annotations

from pathlib import Path

import typer


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("combiner")
    def train_cmd(preset: str = typer.Option("tiny", help="smoke | tiny | paper"),
                  base: str = typer.Option(None, help="override the preset's base (preset name or HF path)"),
                  seed: int = typer.Option(0, help="seed for features and fits"),
                  k_max: int = typer.Option(None, help="fit combiners for k = 1..k_max latent steps (<= 4)"),
                  ce_lr: float = typer.Option(None, help="override the CE fit's learning rate (published: 1e-3)"),
                  ce_steps: int = typer.Option(None, help="override the CE fit's steps (published: 80)"),
                  out: Path = typer.Option(None, help="artifact directory (default models/combiner-<preset>-<base>)")):
        """Cache (h, T_1..T_k, next token) features and fit the combiner by cross-entropy and ridge."""
        from lab.pretrain import ensure_base
        from lab.combiner import Config, artifact_dir, train
        over = {k: v for k, v in dict(base=base, seed=seed, k_max=k_max, ce_lr=ce_lr,
                                                        ce_steps=ce_steps).items() if v is not None}
        cfg = Config.preset(preset, **over)
        b = ensure_base(cfg.base)
        art = train(cfg, b, out_dir=out or artifact_dir(preset, cfg.base))
        for k, fits in art.manifest["metrics"]["fits"].items():
            if k == "control":
                typer.echo(f"no-thought control: val {fits['val_nats']:.4f} nats (base {fits['val_nats_base']:.4f})")
                continue
            typer.echo(f"{k}: base val {fits['ce']['val_nats_base']:.4f} nats | ce {fits['ce']['val_nats']:.4f} | "
                       f"ridge {fits['ridge']['val_nats']:.4f} (lambda {fits['ridge']['lambda']:g}, "
                       f"step {fits['ridge']['step']:.3g})")
        typer.echo(f"artifact: {art.path}")

    @evaluate_app.command("combiner")
    def evaluate_cmd(preset: str = typer.Option("tiny", help="smoke | tiny | paper"),
                     artifact: Path = typer.Option(None, help="artifact directory (default: the preset's)"),
                     out: Path = typer.Option(None, help="report directory (default results/combiner-<preset>)"),
                     formats: str = typer.Option("png,html", help="figure formats, comma-separated")):
        """Bits per byte on held-out text: sliding window (base), chunked base / identity / fitted, delta vs k."""
        from lab import results_dir
        from lab.bases import load_base
        from lab.combiner import Config, artifact_dir, evaluate, load
        cfg = Config.preset(preset)
        path = artifact or artifact_dir(preset, cfg.base)
        art = load(path, None)
        b = load_base(Config.from_dict(art.config).base)
        rep = evaluate(load(path, b), b)
        for m in rep.measures:
            typer.echo(str(m))
        dest = rep.save(out or results_dir() / f"combiner-{preset}", formats=[f for f in formats.split(",") if f])
        typer.echo(f"report: {dest / 'report.md'}")
