"""The `lab` command and the app shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lab.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_bases_lists_presets(smoke_gpt2):
    r = CliRunner().invoke(app, ["bases", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.output)}
    assert rows["smoke-gpt2"]["on_disk"]
    r = CliRunner().invoke(app, ["bases"])
    assert "smoke-gpt2" in r.output and "lab pretrain" in r.output  # the command for what is missing
    line = next(ln for ln in r.output.splitlines() if ln.startswith("smoke-gpt2 "))
    ho = rows["smoke-gpt2"]
    assert f"{ho['heldout_loss']:.3f} [{ho['heldout_loss_ci95'][0]:.3f}" in line and "p = " in line


def test_unknown_preset_is_a_clear_error(lab_home):
    r = subprocess.run([sys.executable, "-m", "lab", "pretrain", "huge-gpt9"], capture_output=True, text=True,
                       env={**os.environ, "LAB_HOME": str(lab_home)})
    assert r.returncode == 2
    assert "unknown preset 'huge-gpt9'" in r.stderr and "Traceback" not in r.stderr


def test_home_page(smoke_gpt2, lab_home):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown) + " ".join(str(df.value) for df in at.dataframe)
    assert "smoke-gpt2" in text


def test_ui_lists_artifacts_from_their_manifests(tmp_path, monkeypatch):
    from lab.store import write_json
    from lab.ui import artifact_rows, artifacts
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    assert artifacts("innerlink", "smoke-gpt2") == {}                   # no models/ at all
    models = tmp_path / "models"
    for rel, kind, base in [("innerlink-b-smoke-gpt2", "innerlink", "smoke-gpt2"),
                            ("innerlink-a-smoke-gpt2", "innerlink", "smoke-gpt2"),
                            ("innerlink-recon-a-smoke-gpt2", "innerlink-recon", "smoke-gpt2"),
                            ("innerlink-a-gpt2", "innerlink", "gpt2"),
                            ("channels-a-smoke-gpt2/adapter", "channels-adapter", "smoke-gpt2"),
                            ("channels-native-a/channels", "channels-native", None)]:
        write_json(models / rel / "manifest.json", {"kind": kind, "base": base and {"name": base}})
    (models / "innerlink-broken").mkdir()
    (models / "innerlink-broken" / "manifest.json").write_text("{not json")
    assert artifacts("innerlink", "smoke-gpt2") == {"innerlink-a-smoke-gpt2": models / "innerlink-a-smoke-gpt2",
                                                    "innerlink-b-smoke-gpt2": models / "innerlink-b-smoke-gpt2"}
    assert artifacts("channels-adapter", "smoke-gpt2") == {"channels-a-smoke-gpt2": models / "channels-a-smoke-gpt2" / "adapter"}
    # the home page's table: every artifact once, the unreadable manifest as "broken" (no picker offers it), a base
    # given as a string kept as None
    (models / "innerlink-oddbase").mkdir()
    write_json(models / "innerlink-oddbase" / "manifest.json", {"kind": "innerlink", "base": "gpt2"})
    rows = {r["artifact"]: (r["kind"], r["base"]) for r in artifact_rows()}
    assert rows["channels-a-smoke-gpt2/adapter"] == ("channels-adapter", "smoke-gpt2")
    assert rows["innerlink-oddbase"] == ("innerlink", None) and rows["innerlink-broken"] == ("broken", None)
    assert len(rows) == 8


def test_ui_stops_with_the_training_command_when_nothing_is_trained():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from lab.ui import stop_if_none
        stop_if_none({}, "inner link", "innerlink", "tiny-mamba2")
        st.markdown("not reached")

    at = AppTest.from_function(page, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    assert "`lab train innerlink --base tiny-mamba2 --preset tiny`" in at.warning[0].value
    assert not at.markdown


@pytest.mark.slow
def test_pretrain_under_accelerate_launch_two_processes(lab_home, tmp_path):
    env = {**os.environ, "LAB_HOME": str(tmp_path)}
    r = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "lab", "pretrain",
                        "smoke-gpt2", "--steps", "60"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "models" / "smoke-gpt2" / "lab_base.json").read_text())
    assert meta["steps"] == 60 and meta["heldout_loss"] < meta["unigram_loss"]
