"""`lab reproduce`: train whatever is missing and run all four experiments end to end.

Writes results/<run>/report.md and report.json (every number with its n, control, CI, seed and the
config hash it came from, beside the published figure it answers) and every figure as PNG, SVG,
PDF and self-contained HTML under results/<run>/<mechanism>/figures/.
"""

from __future__ import annotations

import importlib
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from lab import LabError, results_dir
from lab.bases import list_bases, preset_path
from lab.pretrain import ensure_base, heldout_comparison
from lab.report import Report, p_text
from lab.stats import Measure
from lab.store import atomic_write_text, config_hash, environment, environment_text, read_json, write_json

MECHANISMS = {
    "rlf": "Recursive Latent Forcing",
    "channels": "Proprioceptive channels",
    "innerlink": "Inner link",
    "combiner": "Thinking combiner",
}
PRESETS = ("smoke", "quick", "tiny")
# the lab bases each preset's experiments run on (pretrained first when missing)
PRESET_BASES = {"smoke": ("smoke-gpt2", "smoke-mamba2"), "quick": ("quick-gpt2",), "tiny": ("tiny-gpt2", "tiny-mamba2")}
# measured wall seconds of each part on a 2-core CPU, for the progress line's estimate of the rest
# (`python bench/run.py --reproduce --preset P` measures them again)
EXPECTED_SECONDS = {
    "smoke": {"base": 15, "rlf": 60, "channels": 60, "innerlink": 30, "combiner": 30},
    "quick": {"base": 75, "rlf": 365, "channels": 210, "innerlink": 70, "combiner": 145},
    "tiny": {"base": 280, "rlf": 11600, "channels": 5600, "innerlink": 65, "combiner": 180},
}


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
    loss, diff = Measure(**b["heldout"]["loss"]), Measure(**b["heldout"]["vs_unigram"])
    return (f"| {b['name']} | {loss.value_text()} | {diff.control_value:.3f} | {diff.value_text(signed=True)} | "
            f"{p_text(diff.p_value)} | {diff.n} windows |")


class Progress:
    """One line per part of the job: which part runs, how far the job is, and an estimate of the rest
    (expected seconds of the parts left, scaled by how the finished parts compared with their expectation)."""

    def __init__(self, preset: str, parts: list[tuple[str, str]]):
        self.expected = EXPECTED_SECONDS[preset]
        self.parts, self.done, self.spent, self.t0 = parts, 0, 0.0, time.perf_counter()

    def _left(self) -> float:
        exp_done = sum(self.expected[k] for k, _ in self.parts[: self.done]) or 1.0
        pace = self.spent / exp_done if self.done else 1.0
        return pace * sum(self.expected[k] for k, _ in self.parts[self.done:])

    def start(self, label: str) -> float:
        elapsed = time.perf_counter() - self.t0
        print(f"[reproduce {self.done + 1}/{len(self.parts)}] {label}: elapsed {elapsed / 60:.1f} min, "
              f"about {self._left() / 60:.0f} min left", file=sys.stderr, flush=True)
        return time.perf_counter()

    def finish(self, started: float, label: str, note: str = "") -> None:
        self.spent += time.perf_counter() - started
        self.done += 1
        print(f"[reproduce {self.done}/{len(self.parts)}] {label} done in {time.perf_counter() - started:.0f} s{note}",
              file=sys.stderr, flush=True)


def check_run_name(run: str) -> str:
    """A run name is one plain folder name under results/."""
    if (not isinstance(run, str) or not run.strip() or run in (".", "..") or "/" in run or "\\" in run
            or run.startswith(".") or len(run) > 200 or "\x00" in run or Path(run).is_absolute()):
        raise LabError(f"run must be a plain folder name under results/ (no '/', not starting with '.'), got {run!r}")
    try:
        run.encode("utf-8")
    except UnicodeEncodeError:
        raise LabError(f"run name {run!r} holds characters that are not valid text") from None
    return run


def _section_key(config, commit: str) -> str:
    return config_hash({"config": config.to_dict(), "commit": commit})


def _finished_section(out: Path, key: str) -> Report | None:
    """The section's saved report when a previous, interrupted run of the same code and config finished it."""
    path = out / "report.json"
    if not path.exists():
        return None
    try:
        saved = read_json(path)
    except LabError:
        return None
    if not isinstance(saved, dict) or saved.get("provenance", {}).get("reproduce_key") != key:
        return None
    return Report.from_dict(saved)


def reproduce(preset: str = "quick", run: str | None = None, seed: int = 0,
              mechanisms: tuple[str, ...] = tuple(MECHANISMS)) -> Path:
    """Train what is missing and run every mechanism's pipeline (`lab.<mech>.run(Config.preset(preset, seed=seed))`),
    then write the combined report to results/<run>/. Run again after an interruption, it resumes: finished sections
    of the same code and config are kept, trainings resume from their checkpoints."""
    if preset not in PRESETS:
        raise LabError(f"preset must be one of {PRESETS}, got {preset!r}")
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise LabError(f"unknown mechanism(s) {unknown}; expected some of {list(MECHANISMS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise LabError(f"seed must be a whole number in [0, 2**32), got {seed!r}")
    run = check_run_name(run or f"{preset}-seed{seed}")
    out = results_dir() / run
    out.mkdir(parents=True, exist_ok=True)
    commit = _git_commit()
    missing = [b for b in PRESET_BASES[preset] if not (preset_path(b) / "config.json").exists()]
    progress = Progress(preset, [("base", f"pretrain base {b}") for b in missing]
                        + [(m, MECHANISMS[m]) for m in MECHANISMS if m in mechanisms])
    t0 = time.perf_counter()
    for name in missing:
        started = progress.start(f"pretrain base {name}")
        ensure_base(name)
        progress.finish(started, f"pretrain base {name}")
    sections, failures = [], {}
    for mech, title in MECHANISMS.items():
        if mech not in mechanisms:
            continue
        started = progress.start(title)
        try:
            module = importlib.import_module(f"lab.{mech}")
            config = module.Config.preset(preset, seed=seed)
            key = _section_key(config, commit)
            report = _finished_section(out / mech, key)
            if report is None:
                report = module.run(config)
                if config.PRESET_NOTES.get(preset):
                    report.notes.insert(0, config.PRESET_NOTES[preset])
                report.provenance.setdefault("seed", seed)
                report.provenance["seconds"] = round(time.perf_counter() - started, 1)
                report.provenance["reproduce_key"] = key
                report.save(out / mech)
                progress.finish(started, title)
            else:
                progress.finish(started, title, " (kept from the interrupted run)")
            sections.append((mech, title, report))
        except Exception as e:  # keep going: one broken experiment must not hide the others' numbers
            failures[mech] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    seconds = time.perf_counter() - t0
    header = {
        "run": run, "preset": preset, "seed": seed, "git_commit": commit,
        "seconds": round(seconds, 1), "machine": platform.machine(), "environment": environment(),
        "bases": [_base_row(b) for b in list_bases() if b["on_disk"] and b["name"] in PRESET_BASES[preset]],
    }
    write_json(out / "report.json", {**header, "failures": failures,
                                     "sections": {m: r.to_dict() for m, _, r in sections}})
    md = [f"# Latent Lab report: {run}", ""]
    if preset == "smoke":
        md += ["> **Smoke preset: these numbers mean nothing.** The smoke preset trains for seconds to check that "
               "every step runs; read a `quick` or `tiny` report for results.", ""]
    md += [f"preset `{preset}`, seed {seed}, commit `{commit}`, wall time {seconds / 60:.1f} min", "",
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
