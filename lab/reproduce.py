"""`lab reproduce`: train whatever is missing and run all four experiments end to end.

Writes results/<run>/report.md and report.json (every number with its n, control, CI, seed and the
config hash it came from, beside the published figure it answers) and every figure as PNG, SVG,
PDF and self-contained HTML under results/<run>/<mechanism>/figures/.
"""

from __future__ import annotations

import importlib
import platform
import subprocess
import time
import traceback
from pathlib import Path

from lab import LabError, results_dir
from lab.bases import list_bases, preset_base_name
from lab.pretrain import ensure_base, heldout_comparison
from lab.report import p_text
from lab.store import atomic_write_text, environment, environment_text, write_json

MECHANISMS = {
    "rlf": "Recursive Latent Forcing",
    "channels": "Proprioceptive channels",
    "innerlink": "Inner link",
    "combiner": "Thinking combiner",
}
PRESETS = ("smoke", "tiny")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _base_row(row: dict) -> dict:
    """A base's list_bases() row plus its held-out loss measured now, with a CI and paired against the unigram."""

    return {**row, "heldout": {k: m.to_dict() for k, m in heldout_comparison(row["name"]).items()}}


def _base_md(b: dict) -> str:
    loss, diff = b["heldout"]["loss"], b["heldout"]["vs_unigram"]
    return (f"| {b['name']} | {loss['value']:.3f} [{loss['ci_low']:.3f}, {loss['ci_high']:.3f}] | "
            f"{diff['control_value']:.3f} | {diff['value']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] | "
            f"{p_text(diff['p_value'])} | {diff['n']} windows |")


def reproduce(preset: str = "tiny", run: str | None = None, seed: int = 0,
              mechanisms: tuple[str, ...] = tuple(MECHANISMS)) -> Path:
    """Run every mechanism's `reproduce_section(preset, seed, out_dir)` and write the combined report."""

    if preset not in PRESETS:
        raise LabError(f"preset must be one of {PRESETS}, got {preset!r}")
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise LabError(f"unknown mechanism(s) {unknown}; expected some of {list(MECHANISMS)}")
    run = run or f"{preset}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = results_dir() / run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for arch in ("gpt2", "mamba2"):  # train missing bases first, with progress
        ensure_base(preset_base_name(preset, arch))
    sections, failures = [], {}
    for mech, title in MECHANISMS.items():
        if mech not in mechanisms:
            continue
        t = time.perf_counter()
        try:
            module = importlib.import_module(f"lab.{mech}")
            report = module.reproduce_section(preset=preset, seed=seed, out_dir=out / mech)
            report.provenance.setdefault("seed", seed)
            report.provenance["seconds"] = round(time.perf_counter() - t, 1)
            report.save(out / mech)
            sections.append((mech, title, report))
        except Exception as e:  # keep going: one broken experiment must not hide the others' numbers
            failures[mech] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    seconds = time.perf_counter() - t0
    header = {
        "run": run, "preset": preset, "seed": seed, "git_commit": _git_commit(),
        "seconds": round(seconds, 1), "machine": platform.machine(), "environment": environment(),
        "bases": [_base_row(b) for b in list_bases() if b["on_disk"]],
    }
    write_json(out / "report.json", {**header, "failures": failures,
                                     "sections": {m: r.to_dict() for m, _, r in sections}})
    md = [f"# Latent Lab report: {run}", "",
          f"preset `{preset}`, seed {seed}, commit `{header['git_commit']}`, wall time {seconds / 60:.1f} min", "",
          f"Environment: {environment_text(header['environment'])}", "",
          "| base | held-out loss, nats/token [95% CI] | add-one training unigram, same tokens | difference [95% CI] | "
          "paired p | n |", "|---|---|---|---|---|---|"]
    md += [_base_md(b) for b in header["bases"]]
    for mech, title, report in sections:
        md += ["", f"# {title}", "", report.to_markdown(f"{mech}/figures", with_environment=False).split("\n", 2)[2]]
    if failures:
        md += ["", "# Failures", ""] + [f"- **{m}**: {err}" for m, err in failures.items()]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    if failures:
        raise LabError(f"{len(failures)} experiment(s) failed: {', '.join(failures)}; "
                       f"the report of the others is in {out / 'report.md'}")
    return out
