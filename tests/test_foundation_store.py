"""Artifact store: atomic writes, hashes, base binding, corrupt files; stats; figures; CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import LabError, stats
from lab.store import atomic_dir, load_artifact, save_artifact


def test_artifact_roundtrip_and_base_binding(smoke_gpt2, smoke_mamba2, tmp_path):
    t = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    art = save_artifact(tmp_path / "art", "probe", t, {"lr": 0.1}, base=smoke_gpt2, metrics={"acc": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["art"]  # no temp dirs left
    back = load_artifact(tmp_path / "art", kind="probe", base=smoke_gpt2)
    assert torch.equal(back.tensors["w"], t["w"]) and back.config == {"lr": 0.1}
    assert back.base_name == "smoke-gpt2" and art.manifest["metrics"] == {"acc": 0.5}
    # the package versions that produced it travel with it (seeds repeat a run only within them)
    import transformers
    env = back.manifest["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    with pytest.raises(LabError, match="trained on base 'smoke-gpt2'"):
        load_artifact(tmp_path / "art", base=smoke_mamba2)
    # the same base in another dtype has other weight bytes: refused, and the message says why
    from lab.bases import load_base
    with pytest.raises(LabError, match="trained on the base in float32, this one is loaded in bfloat16"):
        load_artifact(tmp_path / "art", base=load_base(smoke_gpt2.path, dtype=torch.bfloat16))
    with pytest.raises(LabError, match="expected 'rlf'"):
        load_artifact(tmp_path / "art", kind="rlf")


def test_made_on_and_run_hash_tell_a_re_pretrained_base_apart(smoke_gpt2, tmp_path):
    """A base re-pretrained under the same name: same name and config, other fingerprint. Its artifacts
    count as missing (made_on), and a checkpoint is not resumed across it (run_hash)."""
    import copy
    import json

    from lab.store import made_on, run_hash
    retrained = copy.copy(smoke_gpt2)
    retrained.__dict__["fingerprint"] = "f" * 64  # cached_property: the copy's own value
    assert retrained.name == smoke_gpt2.name
    save_artifact(tmp_path / "art", "probe", {"w": torch.zeros(2)}, {"lr": 0.1}, base=smoke_gpt2)
    assert made_on(tmp_path / "art", smoke_gpt2) and not made_on(tmp_path / "art", retrained)
    assert not made_on(tmp_path / "nothing", smoke_gpt2)
    save_artifact(tmp_path / "free", "probe", {"w": torch.zeros(2)}, {}, base=None)
    assert not made_on(tmp_path / "free", smoke_gpt2)
    assert load_artifact(tmp_path / "free").base_name == "?"  # a null base in the manifest
    (tmp_path / "art" / "manifest.json").write_text("{half")
    assert not made_on(tmp_path / "art", smoke_gpt2)
    cfg = {"steps": 10, "base": "smoke-gpt2"}
    assert run_hash(cfg, smoke_gpt2) == run_hash(json.loads(json.dumps(cfg)), smoke_gpt2)
    assert run_hash(cfg, smoke_gpt2) != run_hash(cfg, retrained)


def test_truncated_artifact_is_clear_and_untouched(smoke_gpt2, tmp_path):
    save_artifact(tmp_path / "art", "probe", {"w": torch.randn(50, 50)}, {}, base=smoke_gpt2)
    w = tmp_path / "art" / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:100])
    with pytest.raises(LabError, match="corrupt or truncated"):
        load_artifact(tmp_path / "art")
    assert w.read_bytes() == data[:100]  # loading never rewrites
    (tmp_path / "art" / "manifest.json").write_text("{not json")
    with pytest.raises(LabError, match="not valid JSON"):
        load_artifact(tmp_path / "art")
    with pytest.raises(LabError, match="no artifact"):
        load_artifact(tmp_path / "nothing")


def test_failed_write_leaves_old_artifact(smoke_gpt2, tmp_path):
    save_artifact(tmp_path / "art", "probe", {"w": torch.ones(2)}, {"v": 1}, base=smoke_gpt2)
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "weights.safetensors").write_bytes(b"half")
            1 / 0
    assert load_artifact(tmp_path / "art").config == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_a_replace_killed_between_its_renames_is_recovered(smoke_gpt2, tmp_path, monkeypatch):
    from lab.store import recover_interrupted_replace
    art = tmp_path / "art"
    save_artifact(art, "probe", {"w": torch.ones(2)}, {"v": 1}, base=smoke_gpt2)
    os.rename(art, tmp_path / ".art.old-4242")  # what kill -9 after the first rename leaves
    assert load_artifact(art).config == {"v": 1} and sorted(os.listdir(tmp_path)) == ["art"]
    # the second rename failing (e.g. a full disk) puts the previous version back as well
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(art, "probe", {"w": torch.zeros(2)}, {"v": 2}, base=smoke_gpt2)
    monkeypatch.setattr(os, "rename", real_rename)
    assert load_artifact(art).config == {"v": 1} and sorted(os.listdir(tmp_path)) == ["art"]
    assert recover_interrupted_replace(art) is False  # nothing to recover when the target is there


def test_no_pickle_loading_in_the_code():
    """No pickle ever loads from disk, anywhere in the project's code (calls may span lines)."""
    import json
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    # the patterns are built from pieces so this file does not match itself
    unsafe = [re.compile("torch" + r"\.load\((?![^)]*weights_only\s*=\s*True)", re.S),
              re.compile("pickle" + r"\.loads?\("), re.compile("allow_pickle" + r"\s*=\s*True"),
              re.compile("trust_remote_code" + r"\s*=\s*True")]
    sources = [(py, py.read_text()) for d in ("lab", "app", "bench") for py in (root / d).rglob("*.py")]
    sources += [(nb, "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"]))
                for nb in (root / "notebooks").glob("*.ipynb")]
    assert len(sources) > 40
    for path, src in sources:
        for pat in unsafe:
            assert not pat.search(src), f"{path}: {pat.pattern}"


# --- stats -------------------------------------------------------------------------------------

def test_wilson_and_proportion():
    m = stats.proportion("acc", [1] * 90 + [0] * 10)
    assert m.value == 0.9 and m.n == 100 and m.ci_low < 0.9 < m.ci_high
    assert stats.wilson_ci(0, 10)[0] == 0.0
    assert stats.wilson_ci(0, 500)[0] == 0.0 and stats.wilson_ci(500, 500)[1] == 1.0  # not 4e-19 / 1 - 1e-16
    with pytest.raises(LabError):
        stats.wilson_ci(3, 0)


def test_report_prints_an_underflowed_exact_p_as_below_float_range():
    from lab.report import Report
    rep = Report("r", [stats.Measure("all right", 1.0, 500, 0.99, 1.0, p_value=0.0, test="exact McNemar"),
                       stats.Measure("half", 0.5, 10, 0.2, 0.8, p_value=0.0312, test="exact McNemar")])
    md = rep.to_markdown()
    assert "| < 1e-300 (exact McNemar) |" in md and "| 0.0312 (exact McNemar) |" in md
    assert f"torch {torch.__version__}" in md and rep.to_dict()["environment"]["torch"] == torch.__version__
    assert "Environment:" not in rep.to_markdown(with_environment=False)
    assert rep.measure("half").value == 0.5
    with pytest.raises(LabError, match="no measure named 'halves'; it has:\n  all right\n  half"):
        rep.measure("halves")


def test_mcnemar_exact_against_binomial():
    from scipy.stats import binomtest
    a = np.array([1] * 30 + [0] * 10 + [1] * 5 + [0] * 5, bool)
    b = np.array([1] * 30 + [1] * 10 + [0] * 5 + [0] * 5, bool)
    r = stats.mcnemar_exact(a, b)
    assert r["a_only"] == 5 and r["b_only"] == 10
    assert r["p_value"] == pytest.approx(binomtest(5, 15, 0.5).pvalue)
    m = stats.compare_proportions("full", a, b, "ablated")
    assert m.control == "ablated" and m.p_value == pytest.approx(r["p_value"])


def test_bootstrap_and_paired_delta():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 400)
    lo, hi = stats.bootstrap_ci(x)
    assert lo < 1.0 < hi
    d = stats.paired_delta("delta", x, x - 0.5 + rng.normal(0, 0.1, 400), "control")
    assert d.value == pytest.approx(0.5, abs=0.02) and d.p_value <= 1e-3 and "sign-flip" in d.test


def test_sign_flip_p_is_the_exact_permutation_p_of_the_mean():
    """For n <= 13 scipy enumerates every sign pattern: the p must equal a brute-force count. A skewed sample
    whose mean is ~0 but whose median is not is where a Wilcoxon p and the mean's CI disagree; the sign-flip p
    follows the mean."""
    import itertools
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, 10)
    means = [np.mean(np.array(s) * d) for s in itertools.product((-1, 1), repeat=d.size)]
    exact = np.mean(np.abs(means) >= abs(d.mean()) - 1e-12)
    assert stats.sign_flip_p(d) == pytest.approx(exact)
    skewed = np.concatenate([np.full(40, 0.1), np.full(4, -1.0)])          # mean 0.0 exactly, median 0.1
    assert stats.sign_flip_p(skewed) > 0.5
    from scipy.stats import wilcoxon
    assert wilcoxon(skewed).pvalue < 0.05
    assert stats.sign_flip_p(np.zeros(5)) == 1.0
    with pytest.raises(LabError, match="1-D"):
        stats.sign_flip_p(np.zeros((2, 2)))


def test_paired_t_over_a_few_training_runs():
    """Three seeds: the t interval and p by hand (t quantile with n - 1 degrees of freedom), which a sign-flip
    test could not give (its smallest p at n = 3 is .25)."""
    from scipy.stats import t as t_dist
    treat, ctrl = np.array([1.00, 1.02, 0.99]), np.array([0.97, 0.98, 0.97])
    d = treat - ctrl
    m = stats.paired_t("zeroed minus baseline", treat, ctrl, "baseline")
    se = d.std(ddof=1) / np.sqrt(3)
    assert m.value == pytest.approx(d.mean()) and m.n == 3 and m.control_value == pytest.approx(ctrl.mean())
    assert (m.ci_low, m.ci_high) == pytest.approx((d.mean() - t_dist.ppf(0.975, 2) * se, d.mean() + t_dist.ppf(0.975, 2) * se))
    assert m.p_value == pytest.approx(2 * t_dist.sf(d.mean() / se, 2)) and m.p_value < 0.25 and m.test == "paired t-test"
    from scipy.stats import ttest_rel
    assert m.p_value == pytest.approx(ttest_rel(treat, ctrl).pvalue)
    # a mean against a fixed level (a rate against chance): the interval is of the mean itself
    r = stats.t_mean("rate", [0.30, 0.32, 0.35], 0.29, "chance")
    se = np.std([0.30, 0.32, 0.35], ddof=1) / np.sqrt(3)
    assert r.value == pytest.approx(0.97 / 3) and r.ci_low == pytest.approx(r.value - t_dist.ppf(0.975, 2) * se)
    assert r.p_value == pytest.approx(2 * t_dist.sf((r.value - 0.29) / se, 2)) and r.control == "chance"
    assert stats.t_mean("no test", [0.3, 0.4]).p_value is None                          # no level given: no test
    same = stats.paired_t("no spread", np.array([1.0, 2.0]), np.array([0.5, 1.5]), "c")  # identical differences
    assert same.value == same.ci_low == same.ci_high == 0.5 and same.p_value == stats.sign_flip_p([0.5, 0.5]) == 0.5
    assert "sign-flip" in same.test and same.ci_method.startswith("none")
    for a, b in ((np.ones(3), np.ones(2)), (np.ones(1), np.ones(1))):
        with pytest.raises(LabError, match="paired_t needs two equally long 1-d samples of at least 2 values"):
            stats.paired_t("x", a, b, "c")


def test_paired_ratio_of_timings():
    rng = np.random.default_rng(0)
    load = rng.gamma(4.0, 2.5, 300)                          # shared, drifting load hits both arms of a rep
    bare = 10.0 + load
    hooked = 1.03 * bare + rng.normal(0, 0.05, 300)
    r, lo, hi = stats.paired_ratio(hooked, bare)
    assert lo <= r <= hi
    assert 1.02 < lo and hi < 1.04                           # pairing removes the load: a tight CI
    with pytest.raises(LabError, match="equal length"):
        stats.paired_ratio(hooked, bare[:-1])
    with pytest.raises(LabError, match="positive control"):
        stats.paired_ratio(hooked, -bare)


def test_permutation_and_null():
    rng = np.random.default_rng(1)
    assert stats.permutation_pvalue(rng.normal(0, 1, 50), rng.normal(2, 1, 50), n_resamples=999) < 0.01
    lo, hi = stats.null_quantiles(rng.normal(1, 0.01, 1000))
    assert lo < 1 < hi


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200), st.integers(1, 200))
def test_wilson_property(k, n):
    if k > n:
        with pytest.raises(LabError):
            stats.wilson_ci(k, n)
    else:
        lo, hi = stats.wilson_ci(k, n)
        eps = 1e-12  # floating point at the 0 and 1 boundaries
        assert -eps <= lo <= k / n + eps and k / n - eps <= hi <= 1.0 + eps


# --- figures -----------------------------------------------------------------------------------

def test_export_all_formats(tmp_path):
    from lab.figures import export, line
    fig = line([1, 2, 3], {"a": [1, 2, 3]}, "t", "x", "y", error={"a": ([0.5, 1.5, 2.5], [1.5, 2.5, 3.5])})
    paths = export(fig, tmp_path / "fig")
    assert sorted(p.suffix for p in paths) == [".html", ".pdf", ".png", ".svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fig.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:500]
    assert "plotly" in (tmp_path / "fig.html").read_text()[:20000].lower()
    with pytest.raises(LabError, match="unknown figure format"):
        export(fig, tmp_path / "fig.jpg")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_without_a_browser_says_so(tmp_path, monkeypatch):
    """Without Chromium, kaleido waits forever for a browser: image export must fail at once with the fix named,
    write nothing, and HTML export (which needs no browser) must still work."""
    from choreographer.browsers.chromium import Chromium

    from lab.figures import export, line, to_bytes
    from lab.report import Report
    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kw: None))
    fig = line([1, 2], {"a": [1, 2]}, "t", "x", "y")
    with pytest.raises(LabError, match="needs a Chromium-based browser.*apt-get install chromium"):
        export(fig, tmp_path / "fig.png")
    with pytest.raises(LabError, match="needs a Chromium-based browser"):
        to_bytes(fig, "svg")
    assert list(tmp_path.iterdir()) == []
    assert export(fig, tmp_path / "fig.html")[0].read_text()[:20000].lower().count("plotly") > 0
    assert b"<html" in to_bytes(fig, "html")[:200].lower()
    rep = Report("r")
    rep.figures["f"] = fig
    assert (rep.save(tmp_path / "rep", formats=("html",)) / "figures" / "f.html").exists()
