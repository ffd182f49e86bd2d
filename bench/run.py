"""One command, one run: every bench's measured ratios printed side by side.

    python bench/run.py                        # all benches; reproduce wall time from the last report
    python bench/run.py --reproduce            # first time `lab reproduce --preset quick` from a fresh LAB_HOME,
                                               # then run the benches on that home (the app on its artifacts)
    python bench/run.py --reproduce --write-docs   # ... and write docs/benchmarks.md from this one run
    python bench/run.py foundation rlf         # only some benches
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("foundation", "threads", "app", "rlf", "channels", "innerlink", "combiner")


def _load(name: str):
    path = HERE / f"bench_{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_reproduce(preset: str = "quick") -> dict:
    """Wall time of `lab reproduce` from an empty LAB_HOME (bases, artifacts and all)."""
    home = tempfile.mkdtemp(prefix="lab-reproduce-bench-")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lab", "reproduce", "--preset", preset],
                       env={**os.environ, "LAB_HOME": home})
    return {"reproduce_preset": preset, "reproduce_seconds": time.perf_counter() - t, "reproduce_exit": r.returncode,
            "reproduce_home": home}


def last_reproduce() -> dict:
    from lab import results_dir
    reports = sorted(results_dir().glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return {"reproduce_seconds": "no report yet (run with --reproduce, or `lab reproduce`)"}
    rep = json.loads(reports[-1].read_text())
    return {"reproduce_seconds (last report)": rep.get("seconds"), "reproduce_run": rep.get("run")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="*", default=list(BENCHES))
    ap.add_argument("--reproduce", action="store_true", help="time `lab reproduce` from an empty LAB_HOME")
    ap.add_argument("--preset", default="quick", help="the preset --reproduce times (default: quick, the main job)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md from this run")
    args = ap.parse_args(argv)
    results = {}
    if args.reproduce:   # first, on a quiet machine; the benches after it run on the home it made
        results["reproduce"] = time_reproduce(args.preset)
        os.environ["LAB_HOME"] = results["reproduce"]["reproduce_home"]
    for name in args.benches:
        mod = _load(name)
        if mod is None:
            results[name] = {"status": f"bench/bench_{name}.py not present"}
            continue
        t = time.perf_counter()
        try:
            results[name] = mod.main()
        except Exception as e:
            traceback.print_exc()
            results[name] = {"status": f"failed: {type(e).__name__}: {e}"}
        results[name]["bench_seconds"] = time.perf_counter() - t
    if not args.reproduce:
        results["reproduce"] = last_reproduce()
    print("\n=== Latent Lab bench (one run, side by side) ===")
    for name, rows in results.items():
        print(f"\n[{name}]")
        for k, v in rows.items():
            print(f"  {k:44} {v:.3f}" if isinstance(v, float) else f"  {k:44} {v}")
    if args.write_docs:
        path = write_docs(results, " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])]))
        print(f"\nwrote {path}")
    return results


def write_docs(results: dict, command: str) -> Path:
    """docs/benchmarks.md from one run's results: machine, date and versions in the header, one table a bench."""
    from lab.store import atomic_write_text, environment, environment_text

    lines = ["# Benchmarks", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d')}, one run, every bench side by side "
             f"on the same machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
             f"{environment_text(environment())}.", "",
             "Each `bench/bench_<name>.py` runs alone too and says in its docstring what it measures.", ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| measure | value |", "|---|---|"]
        for k, v in rows.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    path = HERE.parent / "docs" / "benchmarks.md"
    atomic_write_text(path, "\n".join(lines))
    return path


if __name__ == "__main__":
    main()
