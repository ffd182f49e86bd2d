"""Thinking combiner: thinking step on every family, bit-exact identity, fits, bpb evaluators, errors, app."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import LabError
from lab.combiner import bpb as B
from lab.combiner.features import as_tensors, collect_features, load_features, split
from lab.combiner.fit import _ridge_solve, ce_nats, fit_ce, fit_ridge
from lab.combiner.model import Combiner, combined_logits
from lab.combiner.thinking import think, think_every_position

PROMPTS = ["On Monday at dawn, Mara the baker felt", "K = walnut. R = K. What is R? Answer"]


def _ids(base, n=9):
    ids, _ = base.encode(PROMPTS)
    return ids[:, :n]


# --- the thinking step ---------------------------------------------------------------------------

def test_thinking_step_any_base(any_base):
    b = any_base
    ids = _ids(b)
    ref = b.model(input_ids=ids, output_hidden_states=True)
    th = think(b, ids, 4, cached=False)
    assert th.h.shape == (2, b.d_model) and th.T.shape == (2, 4, b.d_model)
    assert th.forwards == 5
    # h is the final-normed state the head reads
    assert torch.equal(th.h, ref.hidden_states[-1][:, -1])
    # T_1 by hand: append h, RMS-normalised to the mean token-embedding RMS (the published feed), as the input
    # embedding of position n, read the final-normed output there
    e_rms = b.embed.weight.float().pow(2).mean(-1).sqrt().mean()
    fed = th.h * (e_rms / th.h.pow(2).mean(-1, keepdim=True).sqrt())
    emb = torch.cat([b.embed(ids), fed[:, None].to(b.dtype)], 1)
    hand = b.model(inputs_embeds=emb, output_hidden_states=True).hidden_states[-1][:, -1]
    assert torch.allclose(th.T[:, 0], hand, atol=1e-5)
    # the unscaled feed: h as the base leaves it
    emb_old = torch.cat([b.embed(ids), th.h[:, None]], 1)
    hand_old = b.model(inputs_embeds=emb_old, output_hidden_states=True).hidden_states[-1][:, -1]
    assert torch.allclose(think(b, ids, 1, feed="final", cached=False).T[:, 0], hand_old, atol=1e-5)
    # T_j does not depend on how many thoughts follow it
    assert torch.allclose(think(b, ids, 1, cached=False).T[:, 0], th.T[:, 0], atol=1e-6)
    # the thought is not the state it came from
    assert not torch.allclose(th.T[:, 0], th.h, atol=1e-3)
    if b.arch != "mamba2":  # continuing the KV cache gives the same thoughts as a full recompute
        cached = think(b, ids, 4, cached=True)
        assert cached.forwards == 5 and cached.positions == ids.shape[1] + 4
        assert torch.allclose(cached.T, th.T, atol=1e-5)
    else:
        with pytest.raises(LabError, match="cached"):
            think(b, ids, 1, cached=True)


def test_feed_scale_zero_or_nan_is_a_clear_error(smoke_gpt2):
    from lab.combiner.config import Config
    from lab.combiner.thinking import thought_input
    h = torch.randn(2, smoke_gpt2.d_model)
    for bad in (0.0, float("nan"), -1.0, float("inf")):
        with pytest.raises(LabError, match="feed scale must be a positive finite number"):
            thought_input(smoke_gpt2, h, "final_embed_rms", bad)
        with pytest.raises(LabError, match="feed_scale"):
            Config.preset("smoke", feed_scale=bad)
    # the scale is what it says: the fed vector's RMS is scale x the mean token-embedding RMS
    e_rms = float(smoke_gpt2.embed.weight.float().pow(2).mean(-1).sqrt().mean())
    x = thought_input(smoke_gpt2, h, "final_embed_rms", 2.5)
    assert torch.allclose(x.float().pow(2).mean(-1).sqrt(), torch.full((2,), 2.5 * e_rms), rtol=1e-5)


def test_think_every_position_matches_prefixes(any_base):
    b = any_base
    ids = _ids(b)[0]
    hs, T = think_every_position(b, ids, 2, batch=4)
    for t in (0, 3, len(ids) - 1):
        th = think(b, ids[None, : t + 1], 2, cached=False)
        assert torch.allclose(hs[t], th.h[0], atol=1e-5)
        assert torch.allclose(T[t], th.T[0], atol=1e-5)


# --- the combiner ----------------------------------------------------------------------------------

def test_zero_init_is_bit_exact_identity(any_base):
    b = any_base
    ids = _ids(b)
    th = think(b, ids, 2)
    c = Combiner(b.d_model)
    assert c.n_params() == b.d_model ** 2 + b.d_model + 1
    for j in range(2):
        got = combined_logits(b, c, th.h, th.T[:, j])
        assert (got - b.unembed(th.h)).abs().max().item() == 0.0
        assert torch.equal(c(th.h, th.T[:, j]), th.h)
    # and head(h) is the base's own next-token logits (up to BLAS rounding of a different matmul shape)
    model_logits = b.model(input_ids=ids).logits[:, -1]
    assert torch.allclose(b.unembed(th.h), model_logits, atol=1e-4)
    # a nonzero combiner does change the logits; alpha / m_scale knobs act
    with torch.no_grad():
        c.M.normal_(0, 0.1)
    assert not torch.equal(combined_logits(b, c, th.h, th.T[:, 0]), b.unembed(th.h))
    assert torch.equal(c(th.h, th.T[:, 0], alpha=0.0, m_scale=0.0), th.h)


def test_mismatched_feature_widths(smoke_gpt2, tmp_path):
    c = Combiner(smoke_gpt2.d_model)
    d = smoke_gpt2.d_model
    with pytest.raises(LabError, match="width"):
        c(torch.zeros(2, d), torch.zeros(2, d + 1))
    with pytest.raises(LabError, match="width"):
        c(torch.zeros(2, d + 3), torch.zeros(2, d + 3))
    bad = {"h": torch.zeros(8, d), "t": torch.zeros(8, d - 1), "y": torch.zeros(8, dtype=torch.long)}
    with pytest.raises(LabError, match="mismatched feature widths"):
        fit_ce(smoke_gpt2, bad, bad, steps=1)
    with pytest.raises(LabError, match="mismatched feature widths"):
        fit_ridge(smoke_gpt2, bad, bad)
    with pytest.raises(LabError, match="d = "):
        Combiner.from_tensors(Combiner(d + 1).tensors(), "", d)
    ds = collect_features(smoke_gpt2, 8, k_max=1, ctx_min=4, ctx_max=6, n_docs=200, batch=4,
                          path=tmp_path / "f", progress=False)
    with pytest.raises(LabError, match="mismatched feature widths"):
        load_features(tmp_path / "f", d=d + 1)
    with pytest.raises(LabError, match="T_1..T_1"):
        as_tensors(ds, 2)


# --- features and fits -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_features(smoke_gpt2, tmp_path_factory):
    path = tmp_path_factory.mktemp("combiner-features") / "f"
    ds = collect_features(smoke_gpt2, 768, k_max=2, ctx_min=8, ctx_max=40, n_docs=1000, seed=0, batch=64,
                          path=path, progress=False)
    return path, ds


def test_features_are_an_arrow_dataset_and_cached(smoke_gpt2, smoke_features):
    from datasets import Dataset
    path, ds = smoke_features
    assert isinstance(ds, Dataset) and len(ds) == 768
    assert (path / "arrow" / "dataset_info.json").exists()
    t = as_tensors(ds, 2)
    assert t["h"].shape == (768, smoke_gpt2.d_model) and t["t"].shape == (768, smoke_gpt2.d_model)
    # a second call is a cache hit returning the same rows
    again = collect_features(smoke_gpt2, 768, k_max=2, ctx_min=8, ctx_max=40, n_docs=1000, seed=0, path=path)
    assert torch.equal(as_tensors(again, 1)["t"], as_tensors(ds, 1)["t"])
    # rows reproduce: h is the final-normed state after the row's context
    lens = ds.select_columns(["ctx_len"])[:]["ctx_len"]
    assert int(lens.min()) >= 8 and int(lens.max()) <= 40


def test_each_fit_seed_samples_its_own_training_windows(smoke_gpt2, tmp_path):
    from lab.combiner import Config
    kw = dict(k_max=1, ctx_min=4, ctx_max=12, n_docs=200, seed=0, batch=16, progress=False)
    first = as_tensors(collect_features(smoke_gpt2, 32, path=tmp_path / "s0", **kw), 1)
    other = as_tensors(collect_features(smoke_gpt2, 32, sample=1, path=tmp_path / "s1", **kw), 1)
    again = as_tensors(collect_features(smoke_gpt2, 32, sample=1, path=tmp_path / "s1-again", **kw), 1)
    assert not torch.equal(first["h"], other["h"]) and torch.equal(other["h"], again["h"])
    # the default samples per seed; a config saved without the field fitted every seed on one sample
    assert Config.preset("smoke").feature_samples == "per_seed"
    saved = Config.preset("smoke").saved()
    saved.pop("feature_samples")
    assert Config.from_dict(saved).feature_samples == "shared"
    with pytest.raises(LabError, match="feature_samples"):
        Config.preset("smoke", feature_samples="per-seed")


def test_both_fits_lower_validation_loss(smoke_gpt2, smoke_features, tmp_path):
    _, ds = smoke_features
    tr, va = split(as_tensors(ds, 1), 0.25, seed=0)
    base_val = float(ce_nats(smoke_gpt2, None, va).mean())
    ce, info = fit_ce(smoke_gpt2, tr, va, steps=30, batch=128, seed=0, ckpt_dir=tmp_path / "ck")
    assert info["val_nats_base"] == pytest.approx(base_val)
    assert info["val_nats"] < base_val
    assert ce.M.abs().sum() > 0 and len(info["history"]) >= 1
    rg, rinfo = fit_ridge(smoke_gpt2, tr, va, lambdas=(1e-2, 1e-1))
    assert rinfo["val_nats"] < base_val and rinfo["step"] > 0  # step 0 is the base itself: the fit must beat it
    assert float(ce_nats(smoke_gpt2, rg, va).mean()) == pytest.approx(rinfo["val_nats"], abs=1e-5)
    # the no-thought control trains alpha and beta only
    ctrl, _ = fit_ce(smoke_gpt2, tr, va, steps=10, batch=128, seed=0, use_thought=False)
    assert torch.count_nonzero(ctrl.M) == 0 and ctrl.beta.abs().sum() > 0


def test_ce_fit_resumes_exactly(smoke_gpt2, smoke_features, tmp_path):
    _, ds = smoke_features
    tr, va = split(as_tensors(ds, 1), 0.25, seed=0)
    full, _ = fit_ce(smoke_gpt2, tr, va, steps=12, batch=64, seed=3)
    fit_ce(smoke_gpt2, tr, va, steps=12, batch=64, seed=3, ckpt_dir=tmp_path / "ck", stop_after=5)
    resumed, _ = fit_ce(smoke_gpt2, tr, va, steps=12, batch=64, seed=3, ckpt_dir=tmp_path / "ck")
    for n, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), n


def test_ridge_solve_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    n, d, lam = 60, 5, 0.3
    H, T = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    D = 0.7 * H + T @ torch.randn(d, d, generator=g, dtype=torch.float64).T + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    alpha, M, beta = _ridge_solve(H, T, D, lam)

    def J(a, M_, b_):
        return float(((D - a * H - T @ M_.T - b_) ** 2).sum() + lam * (M_ ** 2).sum() + lam * a ** 2)
    # the same problem as one vectorised ridge system: unknowns [alpha, vec(M), beta]
    rows = []
    for j in range(d):  # output dim j: D[:, j] = alpha H[:, j] + T M[j] + beta[j]
        blk = torch.zeros(n, 1 + d * d + d, dtype=torch.float64)
        blk[:, 0] = H[:, j]
        blk[:, 1 + j * d: 1 + (j + 1) * d] = T
        blk[:, 1 + d * d + j] = 1
        rows.append(blk)
    X = torch.cat(rows)
    y = D.T.reshape(-1)
    reg = torch.full((1 + d * d + d,), lam, dtype=torch.float64)
    reg[1 + d * d:] = 0
    w = torch.linalg.solve(X.T @ X + torch.diag(reg), X.T @ y)
    assert alpha == pytest.approx(float(w[0]), abs=1e-8)
    assert torch.allclose(M, w[1: 1 + d * d].view(d, d), atol=1e-8)
    assert torch.allclose(beta, w[1 + d * d:], atol=1e-8)
    assert J(alpha, M, beta) <= J(alpha + 1e-3, M, beta)


# --- bits per byte -----------------------------------------------------------------------------------

def test_bytes_are_utf8_bytes_of_the_tokens(smoke_gpt2):
    from lab.corpus import heldout_text
    for text in [heldout_text(5), "café — naïve 日本語 text\n\nwith ünïcödé", "Mara felt  \t calm. "]:
        ids, nb = B.tokenize_with_bytes(smoke_gpt2.tokenizer, text)
        assert nb.sum() == len(text.encode("utf-8")) and len(ids) == len(nb) and (nb >= 0).all()
    # held-out documents joined by EOS (as in pretraining): EOS counts 0 bytes, every other byte counts once
    from lab.corpus import documents
    docs = documents("heldout", 6)
    assert "\n\n".join(docs) == heldout_text(6) == B.heldout_eval_text(6, "text")
    text = B.heldout_eval_text(6, "eos", smoke_gpt2.tokenizer)
    ids, nb = B.tokenize_with_bytes(smoke_gpt2.tokenizer, text)
    eos = smoke_gpt2.tokenizer.eos_token_id
    assert (ids == eos).sum() == 6 and (nb[ids == eos] == 0).all()
    assert nb.sum() == sum(len(d.encode()) for d in docs)
    with pytest.raises(LabError, match="separator"):
        B.heldout_eval_text(6, "tab", smoke_gpt2.tokenizer)
    ids, nb = B.tokenize_with_bytes(smoke_gpt2.tokenizer, "On Monday")
    assert list(nb) == [len(s) for s in smoke_gpt2.tokenizer.convert_ids_to_tokens(ids.tolist())]
    assert B.bpb([math.log(2)] * 4, [1, 1, 1, 1]) == pytest.approx(1.0)
    assert B.bpb([math.log(2)] * 4, [2, 2, 2, 2]) == pytest.approx(0.5)


@pytest.mark.parametrize("n,window,stride", [(50, 16, 4), (50, 16, 16), (50, 10, 3), (20, 64, 8), (41, 8, 1)])
def test_sliding_plan_scores_every_target_once(n, window, stride):
    counts = np.zeros(n - 1, int)
    for b, e, s0 in B.sliding_plan(n, window, stride):
        assert e - b <= window
        counts[b + s0: e] += 1
    assert (counts == 1).all()
    starts = B.context_starts(n, window, stride)
    ctx = np.arange(1, n) - starts
    assert (ctx >= np.minimum(np.arange(1, n), window - stride + 1)).all() and (ctx <= window).all()


@pytest.mark.parametrize("name", ["smoke_gpt2", "smoke_mamba2"])
def test_sliding_window_agrees_with_naive_recompute(name, request):
    b = request.getfixturevalue(name)
    from lab.corpus import heldout_text
    ids, nb = B.tokenize_with_bytes(b.tokenizer, heldout_text(4))
    ids, nb = ids[:90], nb[:90]
    for window, stride in [(32, 8), (24, 24), (16, 1)]:
        s = B.sliding_window(b, ids, nb, window, stride, batch=3)
        naive = B.naive_recompute(b, ids, nb, B.context_starts(len(ids), window, stride))
        assert np.abs(s.nats - naive.nats).max() < 1e-4
        assert s.bpb == pytest.approx(naive.bpb, rel=1e-6)
        assert s.cost()["forwards_per_token"] < 1 <= naive.cost()["forwards_per_token"]
    # stride 1 == naive with a fixed window; a window longer than the text == the full-context recompute
    s1 = B.sliding_window(b, ids, nb, 16, 1)
    assert np.abs(s1.nats - B.naive_recompute(b, ids, nb, window=16).nats).max() < 1e-4
    full = B.sliding_window(b, ids, nb, 128 if b.max_len else 200, 8)
    assert np.abs(full.nats - B.naive_recompute(b, ids, nb).nats).max() < 1e-4


def test_chunked_identity_delta_is_exactly_zero(smoke_gpt2):
    from lab.corpus import heldout_text
    ids, nb = B.tokenize_with_bytes(smoke_gpt2.tokenizer, heldout_text(30))
    feats = B.chunk_features(smoke_gpt2, ids, nb, 32, 2, batch=8)
    assert len(feats) == (len(ids) - 1) // 32 and feats.T.shape[1] == 2
    base = B.score_chunks(smoke_gpt2, feats)
    ident = B.score_chunks(smoke_gpt2, feats, Combiner(smoke_gpt2.d_model), 2)
    assert np.array_equal(base, ident)
    m = B.delta_measure("d", ident, base, feats.nbytes, "base")
    assert m.value == 0.0 and m.ci_low == 0.0 and m.ci_high == 0.0 and m.n == len(feats)
    # the scored tokens are the ones after each chunk, with their own byte counts
    assert int(feats.target[0]) == int(ids[32]) and feats.nbytes[1] == nb[64]
    # the base's chunked score equals a plain forward over each chunk
    x = torch.from_numpy(ids[:32])[None]
    ref = torch.nn.functional.cross_entropy(smoke_gpt2.model(input_ids=x).logits[0, -1:], torch.tensor([int(ids[32])]))
    assert base[0] == pytest.approx(float(ref), abs=1e-5)
    assert B.chunked_cost(feats, 2, True)["forwards_per_token"] == 3


def test_bpb_ci_resamples_documents_and_is_a_ratio_of_sums():
    """Tokens of one document are correlated: a CI over tokens would be too narrow. The bytes per token vary,
    so the resampled statistic is sum(bits) / sum(bytes), not a mean with the bytes held fixed."""
    rng = np.random.default_rng(0)
    eos = 3
    ids = rng.integers(10, 100, 2001)
    ids[50:2000:50] = eos                                    # 40 documents of 50 scored targets each
    units = B.document_units(ids, eos)
    assert np.bincount(units).tolist() == [50] * 40 and B.document_units(ids, None) is None
    nats = np.repeat(rng.normal(2.0, 0.6, 40).clip(0.2), 50) + rng.normal(0, 0.05, 2000)  # per-document level
    nbytes = rng.integers(1, 6, 2000).astype(float)
    by_doc, by_tok = B.bpb_measure("doc", nats, nbytes, units=units), B.bpb_measure("tok", nats, nbytes)
    assert by_doc.value == by_tok.value == pytest.approx(nats.sum() / math.log(2) / nbytes.sum())
    assert (by_doc.n, by_tok.n) == (40, 2000) and by_doc.extra["unit"] == "documents"
    assert by_doc.ci_high - by_doc.ci_low > 3 * (by_tok.ci_high - by_tok.ci_low)
    assert by_doc.ci_low < by_doc.value < by_doc.ci_high
    better = nats - rng.normal(0.1, 0.05, 2000)
    d = B.delta_measure("d", better, nats, nbytes, "base", units=units)
    assert d.value == pytest.approx((better - nats).sum() / math.log(2) / nbytes.sum())
    assert d.n == 40 and d.ci_low < d.value < d.ci_high < 0
    assert d.control_value == pytest.approx(by_doc.value) and d.p_value <= 1e-3 and "sign-flip" in d.test


def test_bad_evaluation_input(smoke_gpt2):
    for empty in ["", "   \n "]:
        with pytest.raises(LabError, match="empty"):
            B.tokenize_with_bytes(smoke_gpt2.tokenizer, empty)
    with pytest.raises(LabError, match="shorter than its stride"):
        B.sliding_plan(100, 8, 16)
    ids, nb = B.tokenize_with_bytes(smoke_gpt2.tokenizer, "On Monday at dawn, Mara the baker felt calm.")
    with pytest.raises(LabError, match="shorter than its stride"):
        B.sliding_window(smoke_gpt2, ids, nb, 4, 5)
    with pytest.raises(LabError, match="positive"):
        B.sliding_window(smoke_gpt2, ids, nb, 0, 0)
    with pytest.raises(LabError, match="fewer than 2 chunks"):
        B.chunk_features(smoke_gpt2, ids, nb, 64, 1)
    with pytest.raises(LabError, match="k"):
        think(smoke_gpt2, torch.from_numpy(ids)[None], 5)
    from lab.combiner import Config
    with pytest.raises(LabError, match="shorter than its stride"):
        Config.preset("smoke", window=8, stride=16)
    with pytest.raises(LabError, match="unknown combiner preset"):
        Config.preset("huge")
    with pytest.raises(LabError, match="separator"):
        Config.preset("smoke", separator="tab")
    with pytest.raises(LabError, match="k_max"):
        Config.preset("smoke", k_max=5)


def test_config_presets_artifact_path_and_saved_form():
    """The artifact records the config without preset_name (which only names its folder), so its hash is the
    same for every preset with the same values; the folder is models/combiner-<preset>-<base>."""
    from lab import models_dir
    from lab.combiner import Config
    cfg = Config.preset("smoke", seed=3)
    assert (cfg.preset_name, cfg.base, cfg.seed, cfg.n_features, cfg.ridge_lambdas) == ("smoke", "smoke-gpt2", 3, 1024, (1e-2, 1e-1))
    assert cfg.artifact_path() == models_dir() / "combiner-smoke-smoke-gpt2"
    assert "preset_name" not in cfg.saved() and set(cfg.saved()) | {"preset_name"} == set(cfg.to_dict())
    assert Config.from_dict(cfg.saved()).with_(preset_name="smoke") == cfg
    assert Config.preset("tiny") == Config(preset_name="tiny")
    assert Config.preset("paper").base == "Qwen/Qwen2.5-0.5B"


# --- the experiment end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(smoke_gpt2):
    """A small fit saved where the app finds it (models/combiner-test-smoke-gpt2)."""
    from lab.combiner import Config, train
    cfg = Config.preset("smoke", n_features=384, k_max=2, ce_steps=12, ce_batch=128, eval_docs=120,
                        check_tokens=40, ridge_lambdas=(1e-1,)).with_(preset_name="test")
    art = train(cfg, smoke_gpt2, progress=False)
    assert art.path == cfg.artifact_path()
    return cfg, art


def test_train_and_evaluate_report(smoke_gpt2, small_run, tmp_path):
    from lab.combiner import FittedCombiners, evaluate, load, train_or_load
    cfg, art = small_run
    model = load(art.path, smoke_gpt2)  # verified against the base fingerprint
    assert isinstance(model, FittedCombiners) and model.artifact.path == art.path
    assert set(model.combiners) == {(f, k) for f in ("ce", "ridge") for k in (1, 2)}
    assert set(model.artifact.tensors) == set(art.tensors)
    assert torch.count_nonzero(model.control.M) == 0 and model[("ce", 1)].M.abs().sum() > 0
    assert [r["k"] for r in model.fit_table()] == ["k1", "k2"]
    # train_or_load finds the same artifact for the same config (nothing retrained) and carries the config
    again = train_or_load(cfg, smoke_gpt2)
    assert again.config == cfg and again.artifact.manifest["weights_sha256"] == art.manifest["weights_sha256"]
    rep = evaluate(model, progress=False)
    ident = rep.measure("delta bpb, identity combiner (chunked)")
    assert ident.value == 0.0 and ident.extra["bit_exact"] and ident.extra["max_abs_token_delta_nats"] == 0.0
    assert "0 (bit-exact)" in rep.published[ident.name].value
    fitted = rep.measure("delta bpb, ce combiner k=1 (chunked)")
    assert fitted.ci_low <= fitted.value <= fitted.ci_high and fitted.n == ident.n > 0
    # every fitted delta over the three fit seeds; the published one-seed delta sits beside the ce k=1 row only
    seeds = rep.measure("delta bpb, ce combiner k=1 (chunked), across 3 fit seeds")
    assert seeds.n == 3 and seeds.ci_low <= seeds.value <= seeds.ci_high and seeds.test
    assert "-0.0189" in rep.published[seeds.name].value and "one seed" in rep.published[seeds.name].value
    assert fitted.name not in rep.published
    per_seed = seeds.extra["per_seed"]
    assert per_seed["0"] == pytest.approx(fitted.value, abs=1e-9) and len(set(per_seed.values())) == 3
    assert set(model.by_seed) == {0, 1, 2}
    assert model.by_seed[1][("ce", 1)].M.abs().sum() > 0
    assert not torch.equal(model.by_seed[1][("ce", 1)].M, model.by_seed[0][("ce", 1)].M)
    for name in ("ridge combiner k=2", "no-thought control (alpha, beta only)", "ce combiner k=1, unscaled feed (h as is)"):
        assert rep.measure(f"delta bpb, {name} (chunked), across 3 fit seeds").n == 3
    # the feed: the published one at the token-embedding scale, the unscaled one ~20x it and nearly h itself
    ratio = rep.measure("feed 'final_embed_rms': |thought input| / |token embedding|")
    unscaled = rep.measure("feed 'final': |thought input| / |token embedding|")
    assert unscaled.value > 5 * ratio.value
    assert rep.measure("feed 'final': cos(T_1, h)").value > rep.measure("feed 'final_embed_rms': cos(T_1, h)").value
    # the two evaluators of the base, side by side
    assert [r["published"] for r in rep.tables["base bpb by evaluator"]] == ["2.13506", "1.26698"]
    slide = rep.measure(f"base bpb (sliding window {cfg.window}, stride {cfg.stride})")
    assert 0 < slide.value < 10 and "1.26698" in rep.published[slide.name].value
    assert rep.tables["sliding_vs_naive"][0]["max_abs_diff_nats"] < 1e-4
    assert [r["k"] for r in rep.tables["delta_vs_k"] if r["fit"] == "ce"] == [1, 2]
    assert {"delta_vs_k", "bpb_arms"} <= set(rep.figures)
    out = rep.save(tmp_path / "rep", formats=("html",))
    assert (out / "report.md").read_text().count("delta bpb") >= 4


def test_half_precision_base_end_to_end(smoke_gpt2, tmp_path):
    """A bfloat16 base: the combiner's parameters stay float32 (ridge's alpha is not rounded to bf16's grid),
    both fits and the bits-per-byte evaluation (chunked, identity, sliding window) run and give finite numbers,
    and the zero-init combiner is still the base bit for bit."""
    from lab.bases import load_base
    from lab.combiner import Config, evaluate, load, train
    from lab.corpus import heldout_text
    b16 = load_base(smoke_gpt2.path, device=smoke_gpt2.device, dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16
    d = b16.d_model
    ds = collect_features(b16, 192, k_max=1, ctx_min=8, ctx_max=24, n_docs=300, seed=0, batch=64,
                          path=tmp_path / "f", progress=False)
    tr, va = split(as_tensors(ds, 1), 0.25, seed=0)
    ce, info = fit_ce(b16, tr, va, steps=4, batch=64, seed=0, ckpt_dir=tmp_path / "ck")
    rg, rinfo = fit_ridge(b16, tr, va, lambdas=(1e-1,))
    for c in (ce, rg):
        assert all(p.dtype == torch.float32 for p in c.parameters())
    assert np.isfinite(info["val_nats"]) and np.isfinite(info["val_nats_base"]) and np.isfinite(rinfo["val_nats"])
    assert float(ce_nats(b16, rg, va).mean()) == pytest.approx(rinfo["val_nats"], abs=1e-5)
    assert float(rg.alpha) == pytest.approx(rinfo["grid"][0]["alpha"], rel=1e-6)  # float32, not bf16's 2^-8 steps
    h, t = va["h"][:3].to(b16.dtype), va["t"][:3].to(b16.dtype)
    logits = combined_logits(b16, ce, h, t)
    assert logits.shape == (3, b16.unembed.weight.shape[0]) and torch.isfinite(logits.float()).all()
    # bits per byte: chunked base / identity / fitted, and the sliding window
    ids, nb = B.tokenize_with_bytes(b16.tokenizer, heldout_text(20))
    feats = B.chunk_features(b16, ids, nb, 32, 1, batch=8)
    base_nats = B.score_chunks(b16, feats)
    assert base_nats.shape == (len(feats),) and np.isfinite(base_nats).all()
    assert np.array_equal(B.score_chunks(b16, feats, Combiner(d), 1), base_nats)  # identity, bit for bit
    for c in (ce, rg):
        nats = B.score_chunks(b16, feats, c, 1)
        assert nats.shape == (len(feats),) and np.isfinite(nats).all() and np.isfinite(B.bpb(nats, feats.nbytes))
    sl = B.sliding_window(b16, ids[:80], nb[:80], 32, 8)
    assert sl.nats.shape == (79,) and np.isfinite(sl.bpb)
    # the experiment end to end: train (both fits per k and the control) and evaluate
    cfg = Config.preset("smoke", n_features=128, k_max=1, ce_steps=3, ce_batch=64, eval_docs=40, check_tokens=20,
                        ridge_lambdas=(1e-1,))
    art = train(cfg, b16, out_dir=tmp_path / "combiner-bf16", progress=False)
    model = load(art, b16)
    loaded = {**model.combiners, "control": model.control}
    assert all(p.dtype == torch.float32 for c in loaded.values() for p in c.parameters())
    rep = evaluate(model, progress=False)
    ident = rep.measure("delta bpb, identity combiner (chunked)")
    assert ident.value == 0.0 and ident.extra["bit_exact"]
    assert all(np.isfinite(m.value) for m in rep.measures)
    assert np.isfinite(rep.measure(f"base bpb (sliding window {cfg.window}, stride {cfg.stride})").value)


def test_cli_trains_and_evaluates(smoke_gpt2, tmp_path, monkeypatch):
    """`lab train combiner` and `lab evaluate combiner` end to end on the smoke preset (made smaller)."""
    from typer.testing import CliRunner

    from lab.cli import app
    from lab.combiner import Config
    orig = Config.preset
    monkeypatch.setattr(Config, "preset", classmethod(lambda cls, name, **kw: orig.__func__(
        cls, name, **{**dict(n_features=384, ce_batch=128, eval_docs=60, check_tokens=40, ridge_lambdas=(1e-1,)), **kw})))
    art = tmp_path / "combiner-cli"
    r = CliRunner().invoke(app, ["train", "combiner", "--preset", "smoke", "--k-max", "1", "--ce-steps", "6",
                                 "--out", str(art)])
    assert r.exit_code == 0, r.output
    assert "k1: base val" in r.output and "| ridge " in r.output and "no-thought control: val" in r.output
    r = CliRunner().invoke(app, ["evaluate", "combiner", "--preset", "smoke", "--artifact", str(art),
                                 "--out", str(tmp_path / "rep"), "--formats", ""])
    assert r.exit_code == 0, r.output
    assert "delta bpb, ce combiner k=1 (chunked)" in r.output and (tmp_path / "rep" / "report.md").exists()


def test_an_artifact_missing_a_fit_record_is_a_clear_error(smoke_gpt2, small_run, tmp_path):
    import json
    import shutil

    from lab.combiner import load
    _, art = small_run
    old = tmp_path / "combiner-old"
    shutil.copytree(art.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["metrics"]["fits"]["k2"]["ridge"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LabError, match=r"lacks the fits \['metrics.fits.k2.ridge.val_nats'\]"):
        load(old, smoke_gpt2)


def test_app_page(smoke_gpt2, small_run):
    from streamlit.testing.v1 import AppTest
    page = Path(__file__).resolve().parents[1] / "app" / "pages" / "4_Thinking_Combiner.py"
    at = AppTest.from_file(str(page), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    before = [m.value for m in at.metric]
    assert before and any("bpb" in m.label for m in at.metric)
    assert len(at.get("plotly_chart")) >= 2
    at.slider(key="comb-m-scale").set_value(0.0).run()
    assert not at.exception
    after = [m.value for m in at.metric]
    assert after != before
    at.slider(key="comb-alpha").set_value(0.05).run()
    assert not at.exception and [m.value for m in at.metric] != after


@pytest.mark.slow
def test_run_smoke(smoke_gpt2, tmp_path):
    from lab.combiner import Config, run
    cfg = Config.preset("smoke")
    rep = run(cfg, progress=False)
    assert (cfg.artifact_path() / "manifest.json").exists()
    assert (rep.save(tmp_path / "out", formats=()) / "report.md").exists()
    assert rep.measure("delta bpb, identity combiner (chunked)").value == 0.0
    assert {"identity delta (zero-init combiner)", "fitted delta before quantization (k=1, cross-entropy fit)"} <= \
        {p.claim for p in rep.published.values()}
    again = run(cfg, smoke_gpt2, progress=False)  # reuses the artifact: same numbers
    assert again.measure("delta bpb, ce combiner k=1 (chunked)").value == rep.measure("delta bpb, ce combiner k=1 (chunked)").value
