"""`lab reproduce` on the smoke preset: a complete, honest report, identical across same-seed runs."""

from __future__ import annotations

import json
import shutil

import pytest

from lab.reproduce import MECHANISMS, reproduce

FORMATS = (".png", ".svg", ".pdf", ".html")


@pytest.fixture(scope="module")
def smoke_report(smoke_results):
    return smoke_results, json.loads((smoke_results / "report.json").read_text())


def test_report_has_every_mechanism_with_honest_numbers(smoke_report):
    out, rep = smoke_report
    assert rep["failures"] == {}
    assert set(rep["sections"]) == set(MECHANISMS)
    md = (out / "report.md").read_text()
    for mech, section in rep["sections"].items():
        assert section["measures"], mech
        for m in section["measures"]:
            assert m["n"] >= 1, (mech, m["name"])
            assert m["ci_low"] is not None or m["p_value"] is not None, (mech, m["name"], "no CI or test")
        assert any(m["published"] for m in section["measures"]), f"{mech}: no number answers a published figure"
        assert section["provenance"].get("seed") == 0
        assert section["provenance"].get("config_hash"), f"{mech}: no config hash in provenance"
        assert MECHANISMS[mech] in md
    # the bases' held-out loss: a CI over windows and a paired test against the unigram on the same tokens
    assert rep["bases"]
    for b in rep["bases"]:
        loss, diff = b["heldout"]["loss"], b["heldout"]["vs_unigram"]
        assert loss["n"] >= 2 and loss["ci_low"] <= loss["value"] <= loss["ci_high"], b["name"]
        assert diff["control"] and diff["p_value"] is not None and diff["n"] == loss["n"], b["name"]
        assert f"| {b['name']} | {loss['value']:.3f} [" in md
    # the package versions that produced the numbers, once at the top of the markdown and in every section
    import torch
    assert rep["environment"]["torch"] == torch.__version__
    assert md.count("Environment: ") == 1 and f"torch {torch.__version__}" in md
    assert all(s["environment"] == rep["environment"] for s in rep["sections"].values())


def test_every_figure_in_every_format(smoke_report):
    out, rep = smoke_report
    for mech, section in rep["sections"].items():
        assert section["figures"], f"{mech} has no figure"
        for key in section["figures"]:
            for ext in FORMATS:
                path = out / mech / "figures" / f"{key}{ext}"
                assert path.exists() and path.stat().st_size > 0, path


def _numbers(rep: dict) -> dict:
    return {(mech, m["name"]): (m["value"], m["n"], m["ci_low"], m["ci_high"], m["p_value"])
            for mech, s in rep["sections"].items() for m in s["measures"]}


@pytest.mark.slow
def test_same_seed_same_numbers_from_scratch(smoke_report, lab_home, tmp_path, monkeypatch):
    """A second run in a fresh LAB_HOME (artifacts retrained from scratch, same bases) gives identical numbers."""
    _, first = smoke_report
    (tmp_path / "models").mkdir()
    for name in ("tokenizer", "smoke-gpt2", "smoke-mamba2"):
        shutil.copytree(lab_home / "models" / name, tmp_path / "models" / name)
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    out = reproduce(preset="smoke", run="ci-smoke-again", seed=0)
    second = json.loads((out / "report.json").read_text())
    assert _numbers(first) == _numbers(second)
