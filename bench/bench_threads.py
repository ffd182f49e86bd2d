"""Threads: a pretraining's step time alone and beside a running app, under torch's defaults and the lab's.

    python bench/bench_threads.py            # ~3 minutes on 2 cores
    python bench/bench_threads.py --steps 30

Each arm runs in fresh processes, so OpenMP reads its environment at start:
- "torch defaults": no OMP_WAIT_POLICY, every process as many intra-op threads as torch picks (the cores);
- "lab defaults": what `lab.configure_threads(role)` and `lab app` give (work = the cores; app = one thread with
  OMP_WAIT_POLICY=PASSIVE; $LAB_THREADS overrides both).
The training is a tiny-gpt2-shaped GPT-2 (d 128, 4 layers, batch 32 x 128) doing AdamW steps; the app is the same
shape generating 12 tokens from a 32-token prompt in a loop, as the dashboard does on a slider move. Printed: the
median step time of each arm alone and beside the app, the slowdown ratio, and the app's median generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROLE_CODE = r"""
import json, os, signal, sys, time
# the bench stops the app with SIGINT: take it even when started from a shell that ignores it (nohup, `cmd &`)
signal.signal(signal.SIGINT, signal.default_int_handler)
mode, role, steps, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "lab":
    import lab
    lab.configure_threads(role)
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=128, n_layer=4, n_head=4, n_positions=256))
out = {"threads": torch.get_num_threads()}
if role == "work":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 2048, (32, 129))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(input_ids=x[:, :-1], labels=x[:, 1:]).loss
        loss.backward(); opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t)
    out["step_s"] = times[3:]
else:
    model.eval()
    ids = torch.randint(0, 2048, (1, 32))
    times, stop = [], time.perf_counter() + seconds
    try:
        with torch.no_grad():
            while time.perf_counter() < stop:
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
                times.append(time.perf_counter() - t)
    except KeyboardInterrupt:  # the bench stops the app once the training beside it is done
        pass
    out["gen_s"] = times
print(json.dumps(out))
"""


def _env(mode: str, role: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.pop("LAB_THREADS", None)
    if mode == "lab" and role == "app":  # what `lab app` gives the dashboard's process
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _spawn(mode: str, role: str, steps: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ROLE_CODE, mode, role, str(steps), str(seconds)],
                            env=_env(mode, role), stdout=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"a bench process failed (exit {p.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def arm(mode: str, steps: int, app_seconds: float) -> dict:
    alone = _result(_spawn(mode, "work", steps, 0))
    app = _spawn(mode, "app", 0, app_seconds)
    time.sleep(3.0)  # the app is up and generating before the training starts
    beside = _result(_spawn(mode, "work", steps, 0))
    if app.poll() is None:
        app.send_signal(signal.SIGINT)
    app_out = _result(app)
    a, b = statistics.median(alone["step_s"]), statistics.median(beside["step_s"])
    return {"threads_work": alone["threads"], "threads_app": app_out.get("threads"),
            "step_alone_s": round(a, 4), "step_beside_app_s": round(b, 4), "slowdown_beside_app": round(b / a, 2),
            "app_generation_s": round(statistics.median(app_out["gen_s"]), 4), "n_steps": len(alone["step_s"])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--app-seconds", type=float, default=900.0, help="the longest the app process keeps generating")
    args = ap.parse_args(argv or [])
    res = {}
    for mode, name in (("torch", "torch defaults"), ("lab", "lab defaults")):
        for k, v in arm(mode, args.steps, args.app_seconds).items():
            res[f"{name}: {k}"] = v
    res["lab / torch step time alone"] = round(res["lab defaults: step_alone_s"] / res["torch defaults: step_alone_s"], 2)
    res["lab / torch step time beside the app"] = round(res["lab defaults: step_beside_app_s"]
                                                        / res["torch defaults: step_beside_app_s"], 2)
    return res


if __name__ == "__main__":
    for k, v in main(sys.argv[1:]).items():
        print(f"{k:45} {v}")
