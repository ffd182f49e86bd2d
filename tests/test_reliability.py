"""Reliability: kill -9 then resume gives the uninterrupted result; fuzzed inputs give LabError or work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lab import LabError
from lab.bases import load_base
from lab.trainer import TrainSpec


def _pretrain_cmd(steps: int):
    return [sys.executable, "-m", "lab", "pretrain", "smoke-gpt2", "--steps", str(steps)]


def test_kill_9_then_resume_matches_uninterrupted(lab_home, smoke_gpt2, tmp_path):
    """SIGKILL mid-run (after a checkpoint), resume: the final weights and metrics equal an uninterrupted run."""
    steps = 150  # checkpoints every 50 steps at this length
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for home in (clean, killed):  # share the tokenizer so both runs see identical token streams
        (home / "models").mkdir(parents=True)
        os.symlink(lab_home / "models" / "tokenizer", home / "models" / "tokenizer")
    env = lambda home: {**os.environ, "LAB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run(_pretrain_cmd(steps), env=env(clean), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_pretrain_cmd(steps), env=env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "models" / ".smoke-gpt2.ckpt" / "trainer.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 50:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; raise `steps`"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "smoke-gpt2").exists()
    r = subprocess.run(_pretrain_cmd(steps), env=env(killed), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    a = load_file(str(clean / "models" / "smoke-gpt2" / "model.safetensors"))
    b = load_file(str(killed / "models" / "smoke-gpt2" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((clean / "models" / "smoke-gpt2" / "lab_base.json").read_text())
    mb = json.loads((killed / "models" / "smoke-gpt2" / "lab_base.json").read_text())
    assert ma["heldout_loss"] == mb["heldout_loss"]
    assert [h["heldout_loss"] for h in ma["history"]] == [h["heldout_loss"] for h in mb["history"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_fuzz_prompts(smoke_gpt2, text):
    try:
        ids, mask = smoke_gpt2.encode(text)
    except LabError:
        return
    assert ids.shape[1] <= smoke_gpt2.max_len
    with torch.no_grad():
        out = smoke_gpt2.model(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all()


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=60).filter(lambda s: "\x00" not in s))
def test_fuzz_base_paths(lab_home, name):
    """Any string is a clear LabError (or a base), never a traceback of another type."""
    try:
        load_base(name)
    except LabError as e:
        assert str(e)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(-5, 5), lr=st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_train_spec(steps, lr):
    try:
        TrainSpec(steps=steps, lr=lr)
    except LabError:
        assert steps < 1 or not (math.isfinite(lr) and lr > 0)
    else:
        assert steps >= 1 and math.isfinite(lr) and lr > 0
