"""The `lab` command: thin wrappers over lab/ functions (the notebooks and app call the same ones)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import typer

from lab import LabError, configure_threads, thread_count
from lab.bases import PRESETS, list_bases
from lab.pretrain import loss_text, vs_unigram_text
from lab.pretrain import pretrain as _pretrain
from lab.readme import write_docs
from lab.reproduce import check_run_name
from lab.reproduce import reproduce as _reproduce

app = typer.Typer(help="Latent Lab: train, probe and demo latent-state mechanisms.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train a mechanism on a base.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate a trained mechanism and write its report.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")

# Each mechanism package may ship `cli.py` with `register(train_app, evaluate_app)`.
MECHANISMS = ("rlf", "channels", "innerlink", "combiner")
for _mech in MECHANISMS:
    if (Path(__file__).parent / _mech / "cli.py").exists():
        importlib.import_module(f"lab.{_mech}.cli").register(train_app, evaluate_app)


@app.command()
def pretrain(name: str = typer.Argument(..., help="preset: " + ", ".join(PRESETS)),
             steps: int = typer.Option(None, help="override the preset's step count"),
             seed: int = typer.Option(None, help="override the preset's seed")):
    """Pretrain a tiny base on the lab corpus (resumes from its checkpoint if interrupted)."""
    m = _pretrain(name, steps=steps, seed=seed)
    if not m:  # a non-main process under `accelerate launch`: the main one reports
        return
    lo, hi = m["heldout_loss_ci95"]
    typer.echo(f"{name}: held-out loss {m['heldout_loss']:.3f} nats/token [{lo:.3f}, {hi:.3f}] (95% bootstrap CI over "
               f"{m['heldout_windows']} windows, {m['heldout_tokens']} tokens) vs the add-one unigram's "
               f"{m['unigram_loss']:.3f}, {m['seconds']:.0f} s")


@app.command()
def bases(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Presets and what is on disk, with their held-out loss."""
    rows = list_bases()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    w = max(14, *(len(r["name"]) for r in rows))
    typer.echo(f"{'name':{w}} {'arch':7} {'d':>4} {'L':>2}  {'on disk':8} {'held-out loss, nats/token [95% CI]':38} "
               f"vs the training unigram (paired, same windows)")
    for r in rows:
        typer.echo(f"{r['name']:{w}} {r['arch']:7} {r['d_model']:>4} {r['layers']:>2}  "
                   f"{'yes' if r['on_disk'] else 'no':8} {loss_text(r):38} {vs_unigram_text(r)}")
        if not r["on_disk"]:
            typer.echo(f"{'':{w}} train it with:  lab pretrain {r['name']}")


@app.command(name="app")
def run_app(port: int = typer.Option(8501, help="port on 127.0.0.1"),
            headless: bool = typer.Option(True, help="do not open a browser")):
    """Start the Streamlit dashboard bound to 127.0.0.1."""
    if not 1 <= port <= 65535:
        raise LabError(f"--port must be a TCP port in 1..65535, got {port}")
    home = Path(__file__).resolve().parents[1] / "app" / "Home.py"
    if not home.exists():
        raise LabError(f"the app is not next to this package (looked for {home}); install the lab with `pip install -e .`")
    cmd = [sys.executable, "-m", "streamlit", "run", str(home), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", str(headless).lower(),
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    # the app's forwards are small and it usually runs beside a training: its own thread count (lab.thread_count)
    # and its OpenMP threads yield the core while they wait instead of spinning on it (`python bench/bench_threads.py`;
    # a training keeps the default: passive waiting cost it ~20% alone)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(thread_count("app")),
           "LAB_THREADS": str(thread_count("app")), "OMP_WAIT_POLICY": "PASSIVE"}
    # exec, not a child process: stopping `lab app` must stop the server, not orphan it
    os.execve(sys.executable, cmd, env)


@app.command()
def reproduce(preset: str = typer.Option("quick", help="quick (the main job, ~15 min on 2 cores), smoke (seconds, "
                                                          "for CI) or tiny (the full CPU experiment, hours)"),
              run: str = typer.Option(None, help="run name under results/ (default: <preset>-seed<seed>; run again "
                                                 "with the same name to resume)"),
              seed: int = typer.Option(0, help="seed for every experiment")):
    """Train whatever is missing and run all four experiments; writes results/<run>/report.md."""
    out = _reproduce(preset=preset, run=run, seed=seed)
    home = f"LAB_HOME={os.environ['LAB_HOME']} " if os.environ.get("LAB_HOME") else ""
    typer.echo(f"report: {out / 'report.md'}")
    typer.echo(f"dashboard on these artifacts:  {home}lab app   (then open http://127.0.0.1:8501)")


@app.command()
def docs(run: str = typer.Option("quick-seed0", help="the reproduce run under results/ to read"),
         screenshot: bool = typer.Option(True, help="also take the dashboard screenshot (needs chromium)")):
    """Regenerate the README's results table and pictures (docs/img/) from a reproduce report."""
    for path in write_docs(check_run_name(run), screenshot=screenshot):
        typer.echo(f"wrote {path}")


def main():
    try:
        configure_threads("work")
        app()
    except LabError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
