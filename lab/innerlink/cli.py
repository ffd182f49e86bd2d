"""`lab train innerlink` / `lab evaluate innerlink`: thin wrappers over lab.innerlink."""

from __future__ import annotations

from pathlib import Path

import typer


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("innerlink")
    def train_innerlink(
        preset: str = typer.Option("tiny", help="smoke (seconds), tiny (CPU minutes) or paper (GPU, real base)"),
        base: str = typer.Option(None, help="override the preset's base (a preset name, model dir or hub name)"),
        seed: int = typer.Option(0, help="seed for the adapter init, batches and controls"),
        steps: int = typer.Option(None, help="override the inner link's training steps"),
        recon: bool = typer.Option(True, help="also train the state-reconstruction hand-off map"),
    ):
        """Cache last-layer states (Arrow), fit R_in with 1 - cos, then (optionally) the reconstruction map."""
        from lab.pretrain import ensure_base
        from lab.innerlink import handoff as H
        from lab.innerlink import reconstruct as RC
        from lab.innerlink.experiment import ensure_trained
        from lab.innerlink.training import Config, load

        cfg = Config.preset(preset, seed=seed, **({"base": base} if base else {}), **({"steps": steps} if steps else {}))
        b = ensure_base(cfg.base)
        art = ensure_trained(cfg, b, preset)
        link, _, a = load(art, b)
        hist = a.manifest["metrics"]["history"]
        typer.echo(f"inner link on {b.name}: {link.n_params():,} parameters (2d²+6d at d={b.d_model}); "
                   f"held-out cos {hist[-1]['heldout_cos']:.3f} after {hist[-1]['step']} steps -> {a.path}")
        if recon:
            items = H.items_for(cfg, seed=seed)
            r = RC.train_recon(cfg, b, link, items, out_dir=RC.artifact_dir(preset, b))
            m = r.manifest["metrics"]
            typer.echo(f"reconstruction map: validation cos(B, A) {m['history'][-1]['val_recon_cos']:.3f} "
                       f"(inner link before training: {m['val_recon_cos_inner_link']:.3f}, n={m['val_items']} items) -> {r.path}")

    @evaluate_app.command("innerlink")
    def evaluate_innerlink(
        preset: str = typer.Option("tiny", help="which preset's artifacts to evaluate"),
        base: str = typer.Option(None, help="override the preset's base"),
        seed: int = typer.Option(0, help="seed for held-out items and controls"),
        items: int = typer.Option(None, help="hand-off items (default: the preset's, >= 200)"),
        out: Path = typer.Option(None, help="report directory (default: results/innerlink-<preset>)"),
    ):
        """Held-out cosine vs controls, m-step rollout, and the hand-off benchmark (all arms)."""
        from lab import LabError, results_dir
        from lab.bases import load_base
        from lab.innerlink import evaluate
        from lab.innerlink import reconstruct as RC
        from lab.innerlink.training import Config, artifact_dir

        cfg = Config.preset(preset, seed=seed, **({"base": base} if base else {}))
        b = load_base(cfg.base)
        path = artifact_dir(preset, b)
        if not path.exists():
            raise LabError(f"no inner link trained for preset {preset!r} on {b.name!r} (looked in {path}); "
                           f"train it with:  lab train innerlink --preset {preset}")
        rdir = RC.artifact_dir(preset, b)
        rep = evaluate(path, b, recon=rdir if rdir.exists() else None, seed=seed, n_items=items)
        out_dir = rep.save(out or results_dir() / f"innerlink-{preset}")
        for m in rep.measures:
            typer.echo(str(m))
        typer.echo(f"report: {out_dir / 'report.md'}")
