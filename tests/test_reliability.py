"""Reliability: kill -9 then resume gives the uninterrupted result; fuzzed inputs give LabError or work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lab import LabError
from lab.bases import load_base
from lab.config import ExperimentConfig
from lab.trainer import MAX_LR, TrainSpec


def _pretrain_cmd(steps: int):
    return [sys.executable, "-m", "lab", "pretrain", "smoke-gpt2", "--steps", str(steps)]


def test_kill_9_then_resume_matches_uninterrupted(lab_home, smoke_gpt2, tmp_path):
    """SIGKILL mid-run (after a checkpoint), resume: the final weights and metrics equal an uninterrupted run."""
    steps = 150  # checkpoints every 50 steps at this length
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for home in (clean, killed):  # share the tokenizer so both runs see identical token streams
        (home / "models").mkdir(parents=True)
        os.symlink(lab_home / "models" / "tokenizer", home / "models" / "tokenizer")
    def env(home):
        return {**os.environ, "LAB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
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
    assert _untimed(ma["history"]) == _untimed(mb["history"])  # the whole recorded curve, training loss included


def _untimed(history: list[dict]) -> list[dict]:
    """A recorded history without its wall-clock fields (the only ones a resumed run may differ in)."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "eval_seconds")} for row in history]


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


_NAMES = st.one_of(st.text(min_size=1, max_size=60),
                   st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=5),
                   st.integers(256, 6000).map(lambda n: "a" * n), st.integers(1, 40).map(lambda n: "ab/" * n),
                   st.sampled_from(["smoke-gtp2", "smoke_gpt2", "tiny-gpt", "\ud800x", "x\x00y", "~nouser/x", "."]))


@settings(max_examples=80, deadline=None)
@given(name=_NAMES)
def test_fuzz_base_paths(lab_home, name):
    """Any string (surrogates, NUL, 6,000 characters, typos of presets) is a clear LabError (or a base), never a
    traceback of another type, and never a trip to the hub."""
    t = time.perf_counter()
    try:
        load_base(name)
    except LabError as e:
        assert str(e)
    assert time.perf_counter() - t < 20


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(-5, 5), lr=st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_train_spec(steps, lr):
    try:
        TrainSpec(steps=steps, lr=lr)
    except LabError:
        assert steps < 1 or not (math.isfinite(lr) and 0 < lr <= MAX_LR)
    else:
        assert steps >= 1 and math.isfinite(lr) and 0 < lr <= MAX_LR


# --- configs and typed RLF problems, as the CLI, notebooks, app and config.json hand them in -------------

_ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(-3, 3), max_size=3))


def _config_classes():
    import importlib
    return {m: importlib.import_module(f"lab.{m}").Config for m in ("rlf", "channels", "innerlink", "combiner")}


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
    from lab.rlf import explain
    try:
        out = explain(rlf_smoke, text, cap)
    except LabError as e:
        assert str(e)
        return
    assert cap >= 1 and 1 <= len(out["loops"]) <= cap


# --- nothing lost: the store replaces only what the lab wrote ------------------------------------------------

def _tree(path):
    """Every file under `path` with its bytes (what 'nothing touched' compares)."""
    from pathlib import Path
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_never_replaces_what_the_lab_did_not_write(smoke_gpt2, lab_home, tmp_path):
    import shutil

    from lab.store import save_artifact
    t = {"w": torch.ones(2)}
    user = tmp_path / "precious"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "notes.md").write_text("more")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    base_copy = tmp_path / "smoke-gpt2"
    shutil.copytree(smoke_gpt2.path, base_copy)
    other = tmp_path / "other-kind"
    save_artifact(other, "combiner", t, {"v": 1}, base=smoke_gpt2)
    mixed = tmp_path / "mixed"
    save_artifact(mixed, "rlf", t, {"v": 1}, base=smoke_gpt2)
    (mixed / "my-notes.txt").write_text("mine")
    for target in (user, a_file, base_copy, other, mixed):
        before = _tree(target)
        with pytest.raises(LabError, match=str(target.name)):
            save_artifact(target, "rlf", t, {"v": 2}, base=smoke_gpt2)
        assert _tree(target) == before, target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or aside copies either
    # an artifact of the same kind is replaced, and so is an empty folder
    same = tmp_path / "same"
    save_artifact(same, "rlf", t, {"v": 1}, base=smoke_gpt2)
    assert save_artifact(same, "rlf", {"w": torch.zeros(2)}, {"v": 2}, base=smoke_gpt2).config == {"v": 2}
    (tmp_path / "empty").mkdir()
    save_artifact(tmp_path / "empty", "rlf", t, {}, base=smoke_gpt2)


def test_atomic_dir_refuses_a_user_folder_before_the_work_and_a_kind_change_after(smoke_gpt2, tmp_path):
    from lab.store import atomic_dir, save_artifact
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("x")
    ran = []
    with pytest.raises(LabError, match="not a folder the lab wrote"):
        with atomic_dir(user):
            ran.append(1)
    assert not ran and _tree(user) == {"a.txt": b"x"}
    art = tmp_path / "art"
    save_artifact(art, "probe", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    with pytest.raises(LabError, match="artifact probe"):  # a checkpoint never overwrites an artifact
        with atomic_dir(art) as tmp:
            (tmp / "trainer.json").write_text("{}")
    assert (art / "manifest.json").exists()


def test_pretrain_refuses_a_user_folder_and_steps_0_before_training(lab_home, tmp_path):
    from lab.pretrain import pretrain
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    t = time.perf_counter()
    with pytest.raises(LabError, match="mine"):
        pretrain("smoke-gpt2", steps=5, out_dir=user)
    for bad in (dict(steps=0), dict(steps=-3), dict(seed=-1)):
        with pytest.raises(LabError, match="steps|seed"):
            pretrain("smoke-gpt2", out_dir=tmp_path / "never", **bad)
    assert time.perf_counter() - t < 10 and _tree(user) == {"thesis.txt": b"x"} and not (tmp_path / "never").exists()
    with pytest.raises(LabError, match="did you mean 'smoke-gpt2'"):
        pretrain("smoke-gtp2")


# --- fingerprints of content, not of place -------------------------------------------------------------------

def test_fingerprint_is_of_content_not_place(smoke_gpt2, tmp_path, monkeypatch):
    import shutil

    from lab.store import load_artifact, made_on, save_artifact
    moved = tmp_path / "elsewhere" / "smoke-gpt2"
    shutil.copytree(smoke_gpt2.path, moved)
    link = tmp_path / "link"
    link.symlink_to(moved)
    monkeypatch.chdir(tmp_path)
    by_relative = load_base("elsewhere/smoke-gpt2")
    by_link = load_base("link")
    by_dot = load_base("./elsewhere/smoke-gpt2")
    assert {smoke_gpt2.fingerprint, by_relative.fingerprint, by_link.fingerprint, by_dot.fingerprint} == {smoke_gpt2.fingerprint}
    art = save_artifact(tmp_path / "art", "probe", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    for b in (by_relative, by_link, by_dot):
        assert made_on(art.path, b)
        load_artifact(art.path, "probe", b)


def test_an_artifact_of_the_legacy_fingerprint_is_recognised_and_re_fingerprinted_once(smoke_gpt2, tmp_path):
    import hashlib

    from lab.store import load_artifact, made_on, read_json, save_artifact, write_json
    # the legacy scheme: the whole config as loaded (its path included) and the weights
    h = hashlib.sha256(json.dumps(smoke_gpt2.model.config.to_dict(), sort_keys=True, default=str).encode())
    for n, t in sorted(smoke_gpt2.model.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    legacy = h.hexdigest()
    assert legacy != smoke_gpt2.fingerprint and smoke_gpt2.has_fingerprint(legacy)
    art = save_artifact(tmp_path / "art", "probe", {"w": torch.ones(2)}, {"v": 1}, base=smoke_gpt2)
    m = read_json(art.path / "manifest.json")
    m["base"]["fingerprint"] = legacy
    for k in ("fingerprint_scheme", "config", "shapes"):  # a manifest of the old format
        m.pop(k)
    write_json(art.path / "manifest.json", m)
    assert made_on(art.path, smoke_gpt2)  # not retrained
    assert read_json(art.path / "manifest.json")["base"]["fingerprint"] == smoke_gpt2.fingerprint  # re-fingerprinted
    assert load_artifact(art.path, "probe", smoke_gpt2).config == {"v": 1}
    # a legacy-looking fingerprint of another base is still another base
    m["base"]["fingerprint"] = "0" * 64
    write_json(art.path / "manifest.json", m)
    assert not made_on(art.path, smoke_gpt2)


# --- divergence is an error ------------------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)


def _tiny_fns(blow_up_at: int | None = None):
    def batch_fn(step, rank, world):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(8, 4, generator=g), "y": torch.randint(0, 3, (8,), generator=g), "step": step}

    def loss_fn(m, batch):
        loss = torch.nn.functional.cross_entropy(m.lin(batch["x"]), batch["y"])
        if blow_up_at is not None and batch["step"] + 1 >= blow_up_at:
            loss = loss * float("inf")
        return loss

    def eval_fn(m):
        return {"w_norm": float(m.lin.weight.norm())}
    return batch_fn, loss_fn, eval_fn


def test_trainer_stops_on_a_non_finite_loss_and_saves_nothing_of_it(tmp_path):
    from lab.trainer import fit
    batch_fn, loss_fn, eval_fn = _tiny_fns(blow_up_at=4)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(LabError, match=r"step 4.*lower learning rate"):
        fit(_Tiny(), batch_fn, loss_fn, TrainSpec(steps=6, lr=1e-2, warmup=0, ckpt_every=2), ckpt_dir=ckpt)
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 2  # the last checkpoint is of finite weights, from before the divergence
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())


def test_trainer_stops_on_a_non_finite_parameter():
    from lab.trainer import fit
    batch_fn, _, _ = _tiny_fns()

    class Huge(torch.autograd.Function):  # a finite loss whose gradient is inf: the update makes the weights inf
        @staticmethod
        def forward(ctx, w):
            return w.sum()

        @staticmethod
        def backward(ctx, g):
            return torch.full((3, 4), float("inf"))

    def inf_grad(m, batch):
        return Huge.apply(m.lin.weight) * 0 + 1.0
    with pytest.raises(LabError, match=r"step 1: parameter lin.weight holds NaN or inf"):
        fit(_Tiny(), batch_fn, inf_grad, TrainSpec(steps=3, lr=1e-2, warmup=0, grad_clip=None))


def test_non_finite_tensors_are_never_saved_or_loaded(smoke_gpt2, tmp_path):
    from safetensors.torch import save_file

    from lab.store import load_artifact, read_json, save_artifact, sha256_file, write_json
    with pytest.raises(LabError, match="NaN or inf"):
        save_artifact(tmp_path / "nan", "probe", {"w": torch.tensor([1.0, float("nan")])}, {}, base=smoke_gpt2)
    assert not (tmp_path / "nan").exists()
    art = save_artifact(tmp_path / "art", "probe", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    save_file({"w": torch.tensor([float("inf"), 0.0])}, str(art.path / "weights.safetensors"))
    m = read_json(art.path / "manifest.json")
    m["weights_sha256"] = sha256_file(art.path / "weights.safetensors")
    write_json(art.path / "manifest.json", m)
    with pytest.raises(LabError, match=r"tensor\(s\) w hold NaN or inf"):
        load_artifact(art.path)


def test_a_report_never_prints_nan_without_saying_why():
    from lab.report import Report
    from lab.stats import Measure
    r = Report("r")
    r.add(Measure("acc", float("nan"), 0))
    r.add(Measure("loss", float("nan"), 10, ci_low=float("nan"), ci_high=float("nan"), control="chance",
                  control_value=float("nan"), p_value=float("nan"), test="t", extra={"why": "the model diverged"}))
    r.tables["t"] = [{"a": float("nan"), "b": 1.0}]
    md = r.to_markdown()
    assert "nan" not in md.lower().replace("n/a", "")
    assert "n/a (n = 0: nothing was measured)" in md and "n/a (the model diverged)" in md


# --- artifacts are what their manifest says --------------------------------------------------------------------

def test_an_edited_config_json_is_named_field_by_field(smoke_gpt2, tmp_path):
    from safetensors.torch import save_file

    from lab.store import load_artifact, read_json, save_artifact, sha256_file, write_json
    cfg = {"loop_rope": True, "k_max": 4, "nested": {"a": 1}}
    art = save_artifact(tmp_path / "art", "rlf", {"w": torch.ones(2, 3)}, cfg, base=smoke_gpt2)
    write_json(art.path / "config.json", {**cfg, "loop_rope": False})
    with pytest.raises(LabError, match=r"changed: loop_rope: true -> false"):
        load_artifact(art.path, "rlf", smoke_gpt2)
    write_json(art.path / "config.json", {})
    with pytest.raises(LabError, match=r"k_max: removed"):
        load_artifact(art.path)
    write_json(art.path / "config.json", {**cfg, "nested": {"a": 2}})
    with pytest.raises(LabError, match=r"nested\.a: 1 -> 2"):
        load_artifact(art.path)
    m = read_json(art.path / "manifest.json")
    del m["config"]  # a manifest that kept only the hash
    write_json(art.path / "manifest.json", m)
    with pytest.raises(LabError, match="hash differs"):
        load_artifact(art.path)
    write_json(art.path / "config.json", cfg)
    assert load_artifact(art.path).config == cfg
    # tensors against their recorded shapes
    save_file({"w": torch.ones(3, 2)}, str(art.path / "weights.safetensors"))
    m["weights_sha256"] = sha256_file(art.path / "weights.safetensors")
    write_json(art.path / "manifest.json", m)
    with pytest.raises(LabError, match="other tensors than its manifest records"):
        load_artifact(art.path)


# --- crash leftovers are invisible and cleaned -----------------------------------------------------------------

DEAD_PID = 4_999_999  # above any pid_max: no such process


def _leave_crash(models, name: str, window: str, smoke_gpt2):
    """What a save of models/<name> killed at `window` leaves: before the first rename (a full temp folder),
    between the renames (the old one aside, the new one in its temp folder), before the aside copy is removed."""
    import shutil

    from lab.store import save_artifact
    art = models / name
    save_artifact(art, "rlf", {"w": torch.ones(2)}, {"v": 1}, base=smoke_gpt2)
    new = models / f".{name}.tmp-{DEAD_PID}-abc"
    shutil.copytree(art, new)
    if window == "before-first-rename":
        return
    if window == "between-renames":
        os.rename(art, models / f".{name}.old-{DEAD_PID}")
        return
    os.rename(art, models / f".{name}.old-{DEAD_PID}")  # after the second rename, before the old one is removed
    os.rename(new, art)


@pytest.mark.parametrize("window", ["before-first-rename", "between-renames", "after-second-rename"])
def test_a_save_killed_at_each_rename_window_leaves_nothing_in_the_pickers(smoke_gpt2, tmp_path, monkeypatch, window):
    import shutil

    from lab import ui
    from lab.store import broken_artifacts, find_artifacts
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    _leave_crash(models, "rlf-smoke-smoke-gpt2", window, smoke_gpt2)
    (models / "channels-x").mkdir()  # a nested artifact's crash too
    _leave_crash(models / "channels-x", "adapter", window, smoke_gpt2)
    picked = ui.artifacts("rlf", "smoke-gpt2")  # what the app's pickers offer
    assert list(picked) == ["channels-x", "rlf-smoke-smoke-gpt2"]
    assert all(not p.name.startswith(".") for p in picked.values())
    assert sorted(r["artifact"] for r in ui.artifact_rows()) == ["channels-x/adapter", "rlf-smoke-smoke-gpt2"]
    # cleaned on this start: no leftover remains, the artifact is whole
    assert sorted(p.name for p in models.iterdir()) == ["channels-x", "rlf-smoke-smoke-gpt2"]
    assert sorted(p.name for p in (models / "channels-x").iterdir()) == ["adapter"]
    assert find_artifacts("rlf", "smoke-gpt2") == picked and not broken_artifacts()
    shutil.rmtree(models)


def test_a_leftover_of_a_live_process_is_left_alone(smoke_gpt2, tmp_path):
    from lab.store import clean_leftovers, save_artifact
    save_artifact(tmp_path / "art", "rlf", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    live = tmp_path / f".art.tmp-{os.getpid()}-xyz"
    live.mkdir()
    clean_leftovers(tmp_path)
    assert live.exists()  # a save in progress (here: this process's)


def test_a_broken_manifest_is_listed_as_broken_and_never_picked(smoke_gpt2, tmp_path, monkeypatch):
    from lab import ui
    from lab.store import save_artifact
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    models = tmp_path / "models"
    save_artifact(models / "rlf-good", "rlf", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    save_artifact(models / "rlf-a-bad", "rlf", {"w": torch.ones(2)}, {}, base=smoke_gpt2)
    (models / "rlf-a-bad" / "manifest.json").write_text("[]")
    (models / "rlf-half").mkdir()
    (models / "rlf-half" / "manifest.json").write_text('{"kind": "rl')
    assert list(ui.artifacts("rlf", "smoke-gpt2")) == ["rlf-good"]  # the default pick is a good one
    rows = {r["artifact"]: r for r in ui.artifact_rows()}
    assert rows["rlf-a-bad"]["kind"] == "broken" and rows["rlf-half"]["kind"] == "broken"
    assert "not valid JSON" in rows["rlf-half"]["problem"] and rows["rlf-good"]["kind"] == "rlf"


# --- bases are checked on load, offline by default --------------------------------------------------------------

def test_a_base_without_tokenizer_files_or_with_an_edited_config_is_refused(smoke_gpt2, tmp_path):
    import shutil
    d = tmp_path / "no-tok"
    shutil.copytree(smoke_gpt2.path, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(LabError, match="no tokenizer files"):
        load_base(str(d))
    for n_layer, says in ((3, "missing keys"), (1, "unexpected keys")):
        e = tmp_path / f"layers-{n_layer}"
        shutil.copytree(smoke_gpt2.path, e)
        cfg = json.loads((e / "config.json").read_text())
        cfg["n_layer"] = n_layer
        (e / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(LabError, match=f"do not match its config.json.*{says}"):
            load_base(str(e))
    f = tmp_path / "other-specials"
    shutil.copytree(smoke_gpt2.path, f)
    cfg = json.loads((f / "config.json").read_text())
    cfg["eos_token_id"] = 7
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LabError, match="eos_token_id"):
        load_base(str(f))


def test_offline_by_default_and_a_typo_fails_at_once(lab_home, monkeypatch):
    import lab.bases as bases
    t = time.perf_counter()
    with pytest.raises(LabError, match="did you mean 'smoke-gpt2'"):
        load_base("smoke-gtp2")
    assert time.perf_counter() - t < 2
    calls = []

    def fake(name, **kw):
        calls.append(kw.get("local_files_only"))
        raise OSError("not in the cache")
    monkeypatch.setattr(bases.AutoConfig, "from_pretrained", fake)
    monkeypatch.delenv("LAB_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(LabError, match="LAB_ALLOW_DOWNLOADS=1"):
        load_base("someone/some-model")
    monkeypatch.setenv("LAB_ALLOW_DOWNLOADS", "1")
    with pytest.raises(LabError, match="nor on the hub"):
        load_base("someone/some-model")
    assert calls == [True, False]  # the hub only when allowed
    with pytest.raises(LabError, match="did you mean"):
        load_base("tiny-gtp2")  # a typo never asks the hub, allowed or not
    assert calls == [True, False]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set for every library the lab calls


def test_malformed_base_metadata_is_skipped_with_a_warning(smoke_gpt2, tmp_path, monkeypatch):
    import shutil

    from lab.bases import list_bases
    from lab.pretrain import loss_text, vs_unigram_text
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    for bad in ("{half", "[]", '{"heldout_loss": "x", "heldout_loss_ci95": 3, "vs_unigram": [1]}'):
        shutil.rmtree(tmp_path / "models", ignore_errors=True)
        shutil.copytree(smoke_gpt2.path, tmp_path / "models" / "smoke-gpt2")
        (tmp_path / "models" / "smoke-gpt2" / "lab_base.json").write_text(bad)
        with warnings_caught() as w:
            rows = {r["name"]: r for r in list_bases()}
        row = rows["smoke-gpt2"]
        assert row["on_disk"] and (row["warning"] or bad.startswith('{"'))
        assert loss_text(row) and vs_unigram_text(row)  # text, not a traceback
        assert bad.startswith('{"') or w
        load_base("smoke-gpt2")  # the base itself still loads


def warnings_caught():
    import warnings
    return warnings.catch_warnings(record=True)


def test_home_page_with_malformed_metadata(smoke_gpt2, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    shutil.copytree(smoke_gpt2.path, tmp_path / "models" / "smoke-gpt2")
    (tmp_path / "models" / "smoke-gpt2" / "lab_base.json").write_text("[]")
    (tmp_path / "models" / "rlf-x").mkdir()
    (tmp_path / "models" / "rlf-x" / "manifest.json").write_text("[]")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "Home.py"), default_timeout=60).run()
    assert not at.exception
    assert any("skipping the metadata" in w.value for w in at.warning)


def test_a_read_only_lab_home_puts_caches_in_a_writable_folder(tmp_path, monkeypatch, lab_home):
    import warnings

    import lab
    from lab.corpus import corpus_tokens, load_tokenizer
    home = tmp_path / "ro-home"
    (home / "models").mkdir(parents=True)
    os.symlink(lab_home / "models" / "tokenizer", home / "models" / "tokenizer")
    monkeypatch.setenv("LAB_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = lab._writable
    monkeypatch.setattr(lab, "_writable", lambda p: False if str(p).startswith(str(home)) else real(p))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = lab.data_dir()
    assert str(d).startswith(str(tmp_path / "cache")) and any("read-only" in str(x.message) for x in w)
    toks = corpus_tokens(load_tokenizer(), "heldout", 20)
    assert len(toks) > 0 and not (home / "data").exists() and any(d.rglob("*.npy"))


# --- the smaller points ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("run", ["../x", "/tmp/abs", "a/b", "", ".", "..", ".hidden", "x\x00y", "\ud800"])
def test_run_names_are_plain_names(run, lab_home):
    from lab.reproduce import check_run_name, reproduce
    with pytest.raises(LabError, match="run"):
        check_run_name(run)
    if run:  # an empty --run means the default name
        with pytest.raises(LabError, match="run"):
            reproduce(preset="smoke", run=run)


def test_resumed_history_equals_the_uninterrupted_one_row_by_row(tmp_path):
    from lab.trainer import fit
    batch_fn, loss_fn, eval_fn = _tiny_fns()
    spec = TrainSpec(steps=12, lr=1e-2, warmup=2, ckpt_every=5, eval_every=2, seed=3)
    a, b = _Tiny(), _Tiny()
    whole = fit(a, batch_fn, loss_fn, spec, ckpt_dir=tmp_path / "a", eval_fn=eval_fn)
    fit(b, batch_fn, loss_fn, spec, ckpt_dir=tmp_path / "b", eval_fn=eval_fn, stop_after=5)
    b2 = _Tiny()  # a new process: only the checkpoint carries over
    resumed = fit(b2, batch_fn, loss_fn, spec, ckpt_dir=tmp_path / "b", eval_fn=eval_fn)
    assert resumed.resumed_from == 5 and len(whole.history) == 6
    assert _untimed(resumed.history) == _untimed(whole.history)  # the training-loss curve included
    assert resumed.running_loss == whole.running_loss
    assert torch.equal(a.lin.weight, b2.lin.weight)


_VALID_SPECS = st.builds(
    TrainSpec, steps=st.integers(1, 4), lr=st.floats(1e-8, MAX_LR), warmup=st.integers(0, 6),
    min_lr_ratio=st.floats(0, 1), weight_decay=st.floats(0, 1),
    grad_clip=st.one_of(st.none(), st.just(0), st.floats(1e-4, 100)), seed=st.integers(0, 2**32 - 1),
    ckpt_every=st.integers(0, 3), eval_every=st.integers(0, 3))


@settings(max_examples=40, deadline=None)
@given(spec=_VALID_SPECS)
def test_one_training_step_on_any_valid_spec(spec):
    """Every TrainSpec that validates trains a step: finite weights, or a clear divergence error."""
    from lab.trainer import fit
    batch_fn, loss_fn, eval_fn = _tiny_fns()
    m = _Tiny()
    try:
        r = fit(m, batch_fn, loss_fn, spec, eval_fn=eval_fn, stop_after=1)
    except LabError as e:
        assert "diverged" in str(e)
        return
    assert r.running_loss is not None and math.isfinite(r.running_loss)
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=1e308), dict(lr=float("nan")), dict(lr=0), dict(grad_clip=-1),
                                 dict(grad_clip=float("inf")), dict(warmup=-1), dict(seed=-1), dict(seed=2**40),
                                 dict(min_lr_ratio=2), dict(weight_decay=-0.1), dict(steps=True), dict(steps=1.5)])
def test_train_spec_rejects_what_a_step_cannot_use(bad):
    with pytest.raises(LabError, match=next(iter(bad))):
        TrainSpec(**bad)


@dataclass
class _DemoConfig(ExperimentConfig):
    MECHANISM: ClassVar[str] = "demo"
    PRESETS: ClassVar[dict] = {"smoke": dict(base="smoke-gpt2")}
    steps: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    text_lr: float = 1e-3
    grad_clip: float = 1.0
    warmup: int = 0


def test_shared_config_checks_reject_zero_steps_and_negative_clips():
    Config = _DemoConfig
    for bad, field_ in ((dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"), (dict(lr=1e308), "lr"),
                        (dict(text_lr=0.0), "text_lr"), (dict(grad_clip=-1.0), "grad_clip"), (dict(warmup=-1), "warmup"),
                        (dict(seed=-1), "seed")):
        with pytest.raises(LabError, match=field_):
            Config.preset("smoke", **bad)
    assert Config.preset("smoke", grad_clip=0.0).grad_clip == 0.0  # 0: no clipping


def test_cli_rejects_zero_steps_bad_seeds_and_ports(smoke_gpt2, lab_home):
    from typer.testing import CliRunner

    from lab.cli import app
    before = (lab_home / "models" / "smoke-gpt2" / "model.safetensors").read_bytes()
    runner = CliRunner()
    for args, says in ((["pretrain", "smoke-gpt2", "--steps", "0"], "steps"), (["pretrain", "smoke-gpt2", "--seed", "-1"], "seed"),
                       (["app", "--port", "99999"], "port"), (["app", "--port", "-1"], "port"),
                       (["reproduce", "--preset", "smoke", "--run", "../x"], "run"),
                       (["reproduce", "--preset", "smoke", "--seed", "-1"], "seed")):
        r = runner.invoke(app, args)
        assert isinstance(r.exception, LabError) and says in str(r.exception), (args, r.exception)
    assert (lab_home / "models" / "smoke-gpt2" / "model.safetensors").read_bytes() == before


def test_generate_and_hooks_reject_bad_numbers(smoke_gpt2):
    from lab import hooks
    for n in (0, -1, 1.5, True):
        with pytest.raises(LabError, match="max_new_tokens"):
            smoke_gpt2.generate("K = walnut.", max_new_tokens=n)
    ids, _ = smoke_gpt2.encode("K = walnut.")
    for bad in (float("nan"), float("inf")):
        v = torch.full((smoke_gpt2.d_model,), bad)
        with pytest.raises(LabError, match="NaN or inf"):
            with hooks.add(smoke_gpt2, 0, v):
                smoke_gpt2.model(ids)
        with pytest.raises(LabError, match="NaN or inf"):
            with hooks.patch(smoke_gpt2, 0, v):
                smoke_gpt2.model(ids)
        with pytest.raises(LabError, match="NaN or inf"):
            with hooks.add_to_layers(smoke_gpt2, {1: v}):
                smoke_gpt2.model(ids)
        with pytest.raises(LabError, match="NaN or inf"):
            hooks.forward(smoke_gpt2, inputs_embeds=torch.full((1, 3, smoke_gpt2.d_model), bad))
    assert hooks.active(smoke_gpt2) == 0
