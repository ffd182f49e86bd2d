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


# --- configs and typed RLF problems, as the CLI, notebooks, app and config.json hand them in -------------

_ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(-3, 3), max_size=3))


def _config_classes():
    from lab.channels.model import Config as ChannelsConfig
    from lab.combiner.experiment import Config as CombinerConfig
    from lab.innerlink.training import Config as InnerLinkConfig
    from lab.rlf.config import Config as RLFConfig
    return {"rlf": RLFConfig, "channels": ChannelsConfig, "innerlink": InnerLinkConfig, "combiner": CombinerConfig}


@pytest.mark.parametrize("mechanism", ["rlf", "channels", "innerlink", "combiner"])
def test_fuzz_experiment_configs(mechanism):
    """Any field set to any JSON-like value: a config, or a LabError that names a field it was given."""
    import dataclasses
    cls = _config_classes()[mechanism]
    names = sorted(f.name for f in dataclasses.fields(cls))

    @settings(max_examples=150, deadline=None)
    @given(over=st.dictionaries(st.sampled_from(names), _ANY_VALUE, min_size=1, max_size=3))
    def check(over):
        try:
            cls(**over)
        except LabError as e:
            assert any(k in str(e) for k in over), (over, str(e))

    check()


def test_config_type_errors_name_the_field_and_the_expected_type():
    from lab.rlf.config import Config
    with pytest.raises(LabError, match=r"steps must be an integer, got '100'"):
        Config(steps="100")
    with pytest.raises(LabError, match=r"lr must be a finite number, got nan"):
        Config(lr=float("nan"))
    with pytest.raises(LabError, match=r"lifeline must be true or false, got 1"):
        Config(lifeline=1)
    assert Config(lr=1).lr == 1  # an integer is a number


_TASK_TEXT = st.lists(st.sampled_from(["K", "R", "D", "SX", " = ", ". ", "walnut", "amber", "What is ", "?",
                                       "\nAnswer:", " ", "=", "\n", "é", "Answer"]), max_size=30).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_TASK_TEXT, st.text(max_size=200)), cap=st.integers(-2, 6))
def test_fuzz_rlf_typed_problems(rlf_smoke, text, cap):
    """What a user types into the app's problem box: per-loop predictions, or a LabError."""
    from lab.rlf.evaluation import explain
    try:
        out = explain(rlf_smoke, text, cap)
    except LabError as e:
        assert str(e)
        return
    assert cap >= 1 and 1 <= len(out["loops"]) <= cap
