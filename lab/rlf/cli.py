"""`lab train rlf` and `lab evaluate rlf`: thin wrappers over lab.rlf (the notebook and app call the same)."""

from __future__ import annotations

from pathlib import Path

import typer

from lab import LabError


def _config(preset: str, base: str | None, core: str, variant: str, seed: int, steps: int | None,
            d_core: int | None, lr: float | None, batch_size: int | None, curriculum_steps: int | None,
            core_layers: int | None = None, curriculum_threshold: float | None = None,
            hop_sampling: str | None = None):
    from lab.rlf.config import Config
    variants = {"full": {}, "no-lifeline": {"lifeline": False}, "no-rope": {"loop_rope": False},
                "answer-only": {"supervision": "answer_only"}, "shuffled": {"shuffle_supervision": True}}
    if variant not in variants:
        raise LabError(f"variant must be one of {', '.join(variants)}, got {variant!r}")
    cfg = Config.preset(preset, base=base, core=core, seed=seed, **variants[variant])
    over = {k: v for k, v in dict(steps=steps, d_core=d_core, lr=lr, batch_size=batch_size,
                                  curriculum_steps=curriculum_steps, core_layers=core_layers,
                                  curriculum_threshold=curriculum_threshold, hop_sampling=hop_sampling).items()
            if v is not None}
    return cfg.with_(**over) if over else cfg


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @train_app.command("rlf")
    def train_rlf(
        base: str = typer.Option(None, help="base preset / HF directory (default: the preset's base)"),
        core: str = typer.Option("transformer", help="transformer | mamba2"),
        preset: str = typer.Option("tiny", help="smoke | tiny | paper"),
        variant: str = typer.Option("full", help="full | no-lifeline | no-rope | answer-only | shuffled (control)"),
        seed: int = typer.Option(0),
        steps: int = typer.Option(None, help="override the preset's steps"),
        d_core: int = typer.Option(None, help="override the core width"),
        core_layers: int = typer.Option(None, help="override the transformer core's depth"),
        lr: float = typer.Option(None),
        batch_size: int = typer.Option(None),
        curriculum_steps: int = typer.Option(None, help="steps over which hops 1..5 open (0: off)"),
        curriculum_threshold: float = typer.Option(
            None, help="also open the next hop count once training accuracy on the newest reaches this (0: off)"),
        hop_sampling: str = typer.Option(None, help="newest | error: how batches draw among the open hop counts"),
        out: Path = typer.Option(None, help="artifact directory (default models/rlf-<preset>-<base>-<core>...)"),
    ):
        """Train the RLF loop (gate + core; the base stays frozen). Resumes if interrupted."""
        from lab.pretrain import ensure_base
        from lab.rlf.training import train
        cfg = _config(preset, base, core, variant, seed, steps, d_core, lr, batch_size, curriculum_steps, core_layers,
                      curriculum_threshold, hop_sampling)
        b = ensure_base(cfg.base)
        art = train(cfg, b, out)
        m = art.manifest["metrics"]
        last = m["final_val"]
        typer.echo(f"{art.path}: validation final-answer acc {last.get('val_acc', float('nan')):.3f} "
                   f"(n={cfg.val_n_per_hop * cfg.max_train_hops} held-out 1-{cfg.max_train_hops}-hop problems), "
                   f"{m['steps']} steps, {m['seconds']:.0f} s")

    @evaluate_app.command("rlf")
    def evaluate_rlf(
        artifact: Path = typer.Argument(..., help="an RLF artifact directory"),
        baseline: list[Path] = typer.Option(None, help="baseline artifact(s) to compare (repeatable)"),
        out: Path = typer.Option(None, help="report directory (default results/<artifact name>)"),
        n: int = typer.Option(None, help="problems per hop count (default: the config's test_n)"),
        probes: bool = typer.Option(True, help="also run the probes (trajectories, gate, ablation, attribution)"),
        null: list[Path] = typer.Option(None, help="control-run artifact(s) for the null-calibrated gate rule"),
        formats: str = typer.Option("png,html", help="figure formats"),
    ):
        """Evaluate an RLF artifact on the held-out 1-12-hop test sets and write report.md + figures."""
        from lab import results_dir
        from lab.rlf.data import heldout_set
        from lab.rlf.evaluation import evaluate
        from lab.rlf.probes import probe_report
        from lab.rlf.training import load
        model = load(artifact)
        rep = evaluate(model, baselines={p.name: p for p in (baseline or [])}, n=n)
        out_dir = Path(out) if out else results_dir() / artifact.name
        fmts = tuple(f for f in formats.split(",") if f)
        rep.save(out_dir, formats=fmts)
        typer.echo(rep.to_markdown().split("\n\n**")[0])
        if probes:
            probs = [p for h in range(1, model.config.max_train_hops + 1) for p in heldout_set(h, min(60, n or 60))]
            pr = probe_report(model, probs, [load(p, model.base) for p in (null or [])])
            pr.save(out_dir / "probes", formats=fmts)
            typer.echo(pr.to_markdown())
        typer.echo(f"report: {out_dir / 'report.md'}")
