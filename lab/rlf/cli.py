"""`lab train rlf` and `lab evaluate rlf`: thin wrappers over lab.rlf (the notebook and app call the same)."""

from __future__ import annotations

from pathlib import Path

import typer

from lab import LabError, results_dir
from lab.config import PRESET_HELP
from lab.rlf.config import BASELINES, NULL_CONTROL, Config
from lab.rlf.evaluate import run
from lab.rlf.train import train

# --variant: the method, each baseline of the report (BASELINES, spelled with hyphens) or the null control
VARIANTS = {"full": {}, **{name.lower().replace(" ", "-"): switch for name, switch in BASELINES.items()},
            "shuffled": NULL_CONTROL}


def _config(preset: str, variant: str = "full", **overrides) -> Config:
    if variant not in VARIANTS:
        raise LabError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return Config.preset(preset, **VARIANTS[variant], **overrides)


def register(train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    preset_opt = typer.Option("tiny", help=PRESET_HELP)
    base_opt = typer.Option(None, help="base preset / HF directory (default: the preset's base)")
    core_opt = typer.Option(None, help="transformer | mamba2 (default: the preset's, transformer)")
    steps_opt = typer.Option(None, help="override the preset's steps")
    d_core_opt = typer.Option(None, help="override the core width")
    core_layers_opt = typer.Option(None, help="override the transformer core's depth")
    curriculum_steps_opt = typer.Option(None, help="steps over which hops 1..5 open (0: off)")
    curriculum_threshold_opt = typer.Option(
        None, help="also open the next hop count once training accuracy on the newest reaches this (0: off)")
    hop_sampling_opt = typer.Option(None, help="newest | error: how batches draw among the open hop counts")

    @train_app.command("rlf")
    def train_rlf(
        preset: str = preset_opt,
        base: str = base_opt,
        core: str = core_opt,
        variant: str = typer.Option("full", help=" | ".join(VARIANTS) + " (the last: the null control)"),
        seed: int = typer.Option(0),
        steps: int = steps_opt,
        d_core: int = d_core_opt,
        core_layers: int = core_layers_opt,
        lr: float = typer.Option(None),
        batch_size: int = typer.Option(None),
        curriculum_steps: int = curriculum_steps_opt,
        curriculum_threshold: float = curriculum_threshold_opt,
        hop_sampling: str = hop_sampling_opt,
        out: Path = typer.Option(None, help="artifact directory (default models/rlf-<preset>-<base>-<core>...)"),
    ):
        """Train the RLF loop (gate + core; the base stays frozen). Resumes if interrupted."""
        cfg = _config(preset, variant, base=base, core=core, seed=seed, steps=steps, d_core=d_core, lr=lr,
                      batch_size=batch_size, curriculum_steps=curriculum_steps, core_layers=core_layers,
                      curriculum_threshold=curriculum_threshold, hop_sampling=hop_sampling)
        art = train(cfg, cfg.load_base(), out)
        m = art.manifest["metrics"]
        last = m["final_val"]
        typer.echo(f"{art.path}: validation final-answer acc {last.get('val_acc', float('nan')):.3f} "
                   f"(n={cfg.val_n_per_hop * cfg.max_train_hops} held-out 1-{cfg.max_train_hops}-hop problems), "
                   f"{m['steps']} steps, {m['seconds']:.0f} s")

    @evaluate_app.command("rlf")
    def evaluate_rlf(
        preset: str = preset_opt,
        base: str = base_opt,
        core: str = core_opt,
        seed: int = typer.Option(0),
        steps: int = steps_opt,
        d_core: int = d_core_opt,
        core_layers: int = core_layers_opt,
        lr: float = typer.Option(None),
        batch_size: int = typer.Option(None),
        curriculum_steps: int = curriculum_steps_opt,
        curriculum_threshold: float = curriculum_threshold_opt,
        hop_sampling: str = hop_sampling_opt,
        test_n: int = typer.Option(None, help="override the problems per hop count in the test sets"),
        out: Path = typer.Option(None, help="report directory (default results/<the method's run name>)"),
        formats: str = typer.Option("png,html", help="figure formats"),
    ):
        """Train what is missing (method, baselines, null controls), evaluate on the held-out 1-12-hop test
        sets, probe, and write report.md + figures."""
        cfg = _config(preset, base=base, core=core, seed=seed, steps=steps, d_core=d_core, core_layers=core_layers,
                      lr=lr, batch_size=batch_size, curriculum_steps=curriculum_steps, curriculum_threshold=curriculum_threshold,
                      hop_sampling=hop_sampling, test_n=test_n)
        rep = run(cfg)
        out_dir = Path(out) if out else results_dir() / cfg.run_name()
        rep.save(out_dir, formats=tuple(f for f in formats.split(",") if f))
        typer.echo(rep.to_markdown().split("\n\n**")[0])
        typer.echo(f"report: {out_dir / 'report.md'}")
