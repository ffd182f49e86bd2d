"""One command, one run: every bench's measured ratios printed side by side.

    python bench/run.py                 # all benches; reproduce wall time from the last report
    python bench/run.py --reproduce     # also time `lab reproduce --preset tiny` from a fresh LAB_HOME
    python bench/run.py foundation rlf  # only some benches
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("foundation", "rlf", "channels", "innerlink", "combiner")


def _load(name: str):
    path = HERE / f"bench_{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_reproduce(preset: str = "tiny") -> dict:
    """Wall time of `lab reproduce` from an empty LAB_HOME (bases, artifacts and all)."""
    home = tempfile.mkdtemp(prefix="lab-reproduce-bench-")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lab", "reproduce", "--preset", preset, "--run", "bench"],
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
    ap.add_argument("--reproduce", action="store_true", help="time lab reproduce --preset tiny from scratch")
    args = ap.parse_args(argv)
    results = {}
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
    results["reproduce"] = time_reproduce() if args.reproduce else last_reproduce()
    print("\n=== Latent Lab bench (one run, side by side) ===")
    for name, rows in results.items():
        print(f"\n[{name}]")
        for k, v in rows.items():
            print(f"  {k:44} {v:.3f}" if isinstance(v, float) else f"  {k:44} {v}")
    return results


if __name__ == "__main__":
    main()
