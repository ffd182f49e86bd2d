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


def test_smoke_report_opens_with_a_warning(smoke_report):
    out, _ = smoke_report
    head = (out / "report.md").read_text().split("\n", 4)
    assert "these numbers mean nothing" in "\n".join(head)


def test_a_rerun_keeps_finished_sections_and_says_so(smoke_report, capfd):
    """A run interrupted after some sections resumes there: a section finished by the same code and config is kept
    (its report.json untouched), the others run; the progress lines name each part."""
    out, rep = smoke_report
    kept = out / "combiner" / "report.json"
    before = kept.stat().st_mtime_ns
    capfd.readouterr()
    again = reproduce(preset="smoke", run=out.name, seed=0, mechanisms=("combiner",))
    err = capfd.readouterr().err
    assert again == out and kept.stat().st_mtime_ns == before
    assert "[reproduce 1/1] Thinking combiner" in err and "kept from the interrupted run" in err
    second = json.loads((out / "report.json").read_text())
    assert _numbers({"sections": {"combiner": second["sections"]["combiner"]}}) == \
        _numbers({"sections": {"combiner": rep["sections"]["combiner"]}})


def test_a_changed_config_is_not_kept(smoke_report):
    """A finished section is kept only for the same config: another one is a different experiment."""
    from lab.combiner import Config
    from lab.reproduce import _finished_section, _section_key
    out, _ = smoke_report
    saved = json.loads((out / "combiner" / "report.json").read_text())
    key = saved["provenance"]["reproduce_key"]
    assert _finished_section(out / "combiner", key) is not None
    other = _section_key(Config.preset("smoke", ce_steps=41), "any-commit")
    assert _finished_section(out / "combiner", other) is None


def test_progress_estimates_what_is_left():
    from lab.reproduce import Progress
    p = Progress("quick", [("base", "b"), ("rlf", "r"), ("combiner", "c")])
    assert p._left() == pytest.approx(sum(p.expected[k] for k in ("base", "rlf", "combiner")))
    p.done, p.spent = 1, 2 * p.expected["base"]  # the first part took twice its expectation
    assert p._left() == pytest.approx(2 * (p.expected["rlf"] + p.expected["combiner"]))


def test_readme_results_table_comes_from_the_report(smoke_report, tmp_path):
    """`lab docs` writes each measure with a published figure, value [CI], n and test, between the README markers."""
    from lab.readme import END, START, headline_rows, write_results
    _, rep = smoke_report
    rows = headline_rows(rep)
    published = [m for s in rep["sections"].values() for m in s["measures"] if m.get("published")]
    assert len(rows) == len(published) and rows
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\nrest\n")
    write_results(readme, rep)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "old" not in text
    first = rows[0]
    cells = [str(first[c]).replace("|", "/") for c in ("mechanism", "measure", "lab [95% CI]")]
    assert "| " + " | ".join(cells) + " |" in text
