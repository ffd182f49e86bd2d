"""Inner link: adapter shape, Arrow state cache, resumable training, rollout, hand-off benchmark,
state reconstruction, bad input, CLI and the app page (smoke bases, CPU, seconds each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lab import LabError
from lab.corpus import PERSONAS
from lab.innerlink import Config, InnerLink, param_count
from lab.innerlink import handoff as H


def small_config(**kw) -> Config:
    return Config.preset("smoke", **{**dict(train_docs=80, heldout_docs=24, steps=12, batch_size=64, warmup=2,
                                            eval_rows=256, rollout_prompts=12), **kw})


@pytest.fixture(scope="module")
def trained(smoke_gpt2, lab_home):
    from lab.innerlink.train import artifact_dir, load, train
    cfg = small_config()
    art = train(cfg, smoke_gpt2, out_dir=artifact_dir("test", smoke_gpt2))
    link = load(art.path, smoke_gpt2)
    return cfg, art, link


# --- adapter ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [8, 64, 5120])
def test_param_count_matches_formula(d):
    m = InnerLink(d)
    assert m.n_params() == param_count(d) == 2 * d * d + 6 * d
    assert tuple(m.w1.weight.shape) == (d, d) and tuple(m.w2.weight.shape) == (d, d)
    if d == 5120:
        assert m.n_params() == 52_459_520  # the published count


def test_adapter_is_the_published_formula():
    torch.manual_seed(0)
    m = InnerLink(16)
    for p in m.parameters():  # non-trivial affine so every term matters
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(3, 5, 16)
    ln = torch.nn.functional.layer_norm
    x = ln(h, (16,), m.ln_pre.weight, m.ln_pre.bias)
    inner = torch.nn.functional.gelu(x @ m.w1.weight.T + m.w1.bias) @ m.w2.weight.T + m.w2.bias
    want = ln(h + inner, (16,), m.ln_post.weight, m.ln_post.bias)
    torch.testing.assert_close(m(h), want)


def test_wrong_width_latent_is_laberror():
    m = InnerLink(16)
    with pytest.raises(LabError, match="width 12.*d=16"):
        m(torch.randn(2, 12))
    with pytest.raises(LabError, match="positive int"):
        InnerLink(0)


# --- cache and training ------------------------------------------------------------------------------

def test_cache_is_memory_mapped_arrow_with_fingerprint(trained, smoke_gpt2):
    from lab.innerlink.cache import cache_path, load_cache
    cfg = trained[0]
    p = cache_path(smoke_gpt2, "train", cfg.train_docs, cfg.cache_seed, cfg.max_tokens)
    c = load_cache(p, smoke_gpt2)
    assert (p / "states.arrow").exists() and c.meta["fingerprint"] == smoke_gpt2.fingerprint
    assert len(c) == c.meta["rows"] > 100
    import datasets
    assert isinstance(c.table, datasets.Dataset) and c.table.cache_files  # backed by the file, not RAM
    h, y = c.rows([0, 1, 2])
    assert h.shape == (3, smoke_gpt2.d_model) and y.dtype == torch.long
    # the cached row is the base's own last-layer state at that position, and y its next token
    from lab.corpus import documents
    from lab.innerlink.cache import last_layer_states
    doc = documents("train", 1, cfg.cache_seed)[0]
    ids = smoke_gpt2.tokenizer.encode(doc, add_special_tokens=False)[: cfg.max_tokens]
    ref = last_layer_states(smoke_gpt2, torch.tensor([ids]))[0]
    torch.testing.assert_close(h[1], ref[1], atol=1e-4, rtol=1e-4)
    assert int(y[1]) == ids[2]


def test_cache_is_keyed_by_its_token_cut(trained, smoke_gpt2):
    """A cache cut at another max_tokens holds other rows: it is another cache, and a directory whose
    record disagrees with what was asked for is refused, not silently reused."""
    import shutil

    from lab.innerlink.cache import cache_path, get_cache
    cfg = trained[0]
    short = get_cache(smoke_gpt2, "heldout", 3, cfg.cache_seed, max_tokens=8)
    assert short.meta["max_tokens"] == 8 and short.path == cache_path(smoke_gpt2, "heldout", 3, cfg.cache_seed, 8)
    longer = get_cache(smoke_gpt2, "heldout", 3, cfg.cache_seed, max_tokens=16)
    assert longer.path != short.path and len(longer) > len(short)
    misnamed = cache_path(smoke_gpt2, "heldout", 3, cfg.cache_seed, 32)
    shutil.copytree(short.path, misnamed)
    try:
        with pytest.raises(LabError, match="built with max_tokens=8, but max_tokens=32 was asked for"):
            get_cache(smoke_gpt2, "heldout", 3, cfg.cache_seed, max_tokens=32)
    finally:
        shutil.rmtree(misnamed)


def test_control_tokens_are_never_the_target():
    import numpy as np

    from lab.innerlink.evaluate import other_tokens
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)  # few distinct tokens: a plain permutation would clash on about a third of rows
    other = other_tokens(y, y, rng)
    assert (other != y).all() and set(other.tolist()) <= set(y.tolist())
    with pytest.raises(LabError, match="pool of 1 distinct token"):
        other_tokens(np.array([4, 4]), np.array([4, 4, 4]), rng)


def test_cache_from_another_base_is_laberror(trained, smoke_gpt2, smoke_mamba2):
    from lab.innerlink.cache import cache_path, load_cache
    cfg = trained[0]
    p = cache_path(smoke_gpt2, "train", cfg.train_docs, cfg.cache_seed, cfg.max_tokens)
    assert smoke_mamba2.d_model == smoke_gpt2.d_model  # same width: only the fingerprint tells them apart
    with pytest.raises(LabError, match="made on base 'smoke-gpt2'.*rebuild the cache"):
        load_cache(p, smoke_mamba2)
    with pytest.raises(LabError, match="no inner-link state cache"):
        load_cache(p.parent / "nope", smoke_gpt2)


def test_artifact_saved_through_store_and_tied_to_base(trained, smoke_gpt2, smoke_mamba2):
    from lab.innerlink.train import load
    cfg, art, link = trained
    assert link.config == Config.from_dict(art.config) and link.artifact.path == art.path
    assert (art.path / "weights.safetensors").exists() and art.manifest["kind"] == "innerlink"
    assert art.manifest["base"]["fingerprint"] == smoke_gpt2.fingerprint
    assert art.manifest["metrics"]["n_params"] == param_count(smoke_gpt2.d_model)
    with pytest.raises(LabError, match="trained on base 'smoke-gpt2'"):
        load(art.path, smoke_mamba2)


def test_training_improves_heldout_cosine_and_beats_controls(trained, smoke_gpt2):
    from lab.innerlink.cache import caches
    from lab.innerlink.evaluate import cosine_measures, heldout_cosines
    cfg, art, link = trained
    hist = art.manifest["metrics"]["history"]
    assert hist[-1]["heldout_cos"] > 0.5
    _, held = caches(cfg, smoke_gpt2)
    ms = cosine_measures(heldout_cosines(link, smoke_gpt2, held))
    main, ctrl, gain = ms[0], ms[1], ms[2]
    assert main.n == cfg.heldout_docs and main.ci_low <= main.value <= main.ci_high
    assert main.value > ctrl.value and gain.ci_low > 0 and gain.p_value < 0.05
    assert main.extra["n_tokens"] == len(held)
    # the figure draws each control at its own mean with its own CI (not the paired difference's CI)
    from lab.innerlink.evaluate import cosine_figure
    bars = cosine_figure(ms).data[0]
    for i, m in ((2, ms[3]), (3, ms[4])):
        lo, hi = m.extra["control_ci"]
        assert bars.y[i] == m.control_value and lo <= m.control_value <= hi
        assert bars.error_y.array[i] == pytest.approx(hi - m.control_value)


def test_training_resumes_exactly(smoke_gpt2, tmp_path):
    from lab.innerlink.train import train
    cfg = small_config(steps=6, seed=3)
    full = train(cfg, smoke_gpt2, out_dir=tmp_path / "full")
    assert train(cfg, smoke_gpt2, out_dir=tmp_path / "part", stop_after=3) is None
    assert (tmp_path / ".part.ckpt" / "trainer.json").exists()
    resumed = train(cfg, smoke_gpt2, out_dir=tmp_path / "part")
    for k, v in full.tensors.items():
        torch.testing.assert_close(resumed.tensors[k], v)


def test_latent_rollout_feeds_latents_as_input_embeddings(trained, smoke_gpt2):
    from lab.hooks import forward
    from lab.innerlink.evaluate import rollout_eval
    from lab.innerlink.model import latent_rollout
    cfg, _, link = trained
    ids = torch.tensor([smoke_gpt2.tokenizer.encode("K = walnut. What is K?", add_special_tokens=False)])
    lat, raw = latent_rollout(smoke_gpt2, link, smoke_gpt2.embed(ids), 3)
    assert lat.shape == raw.shape == (1, 3, smoke_gpt2.d_model)
    # step 2's raw state is the base's last-layer state after appending latent 1 as an input embedding
    x = torch.cat([smoke_gpt2.embed(ids), lat[:, :1]], 1)
    out = forward(smoke_gpt2, inputs_embeds=x)
    torch.testing.assert_close(smoke_gpt2.unembed(raw[:, 1]), out.logits[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lat[:, 0], link(raw[:, 0]))
    table, _ = rollout_eval(link, smoke_gpt2, cfg)
    assert [r["step"] for r in table] == [1, 2, 3, 4] and all(r["n"] == cfg.rollout_prompts for r in table)
    for r in table:  # every rate and mean the rollout table reports carries its 95% interval
        for key in ("cos_gold", "cos_greedy_token", "cos_control", "nearest_is_greedy"):
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"]
    with pytest.raises(LabError, match="width"):
        latent_rollout(smoke_gpt2, link, torch.randn(1, 3, smoke_gpt2.d_model + 1), 2)
    with pytest.raises(LabError, match="steps >= 1"):
        latent_rollout(smoke_gpt2, link, smoke_gpt2.embed(ids), 0)


# --- hand-off benchmark ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["persona", "pointer"])
def test_items_heldout_and_not_guessable_from_bs_prompt(task):
    test = H.make_items(300, "test", 0, task)
    assert len({it.a_prompt for it in test}) == 300 and test == H.make_items(300, "test", 0, task)
    train = H.make_items(300, "train", 0, task, exclude={it.a_prompt for it in test})
    assert not {it.a_prompt for it in train} & {it.a_prompt for it in test}
    for it in test:
        assert it.answer.split()[-1] not in it.question          # the answer is never in B's prompt
        assert it.answer.split()[-1] in it.material               # ...it is in A's material
        assert it.a_prompt.endswith(it.question) and it.task == task
    golds = [it.answer for it in test]
    assert max(golds.count(g) for g in set(golds)) / len(golds) < 0.12  # no answer dominates
    assert {it.answer for it in H.make_items(300, "test", 0, "persona")} == {n for n, _ in PERSONAS}


def test_state_task_hands_off_before_the_question_and_shares_the_stories():
    state = H.make_items(60, "test", 0, "persona_state")
    nxt = H.make_items(60, "test", 0, "persona")
    assert [(a.material, a.question, a.answer) for a in state] == [(b.material, b.question, b.answer) for b in nxt]
    for it in state:
        assert it.state and it.handoff_prompt == it.material and it.a_prompt == it.material + it.question
        assert it.answer not in it.question and it.answer in it.material
    assert all(not it.state and it.handoff_prompt == it.a_prompt for it in nxt)
    assert state[0].score(" Mara feel calm.") == "Mara" == nxt[0].score(" Mara feel calm.")  # scored alike
    # the open answer set: each half's items name only that half's personas
    for half in H.PERSONA_HALVES:
        assert {it.answer for it in H.make_items(200, "train", 0, "persona_state", answers=half)} == set(half)
    assert not set(H.PERSONA_HALVES[0]) & set(H.PERSONA_HALVES[1])
    with pytest.raises(LabError, match="no persona"):
        H.make_items(3, "test", 0, "persona_state", answers=("Nobody",))


def test_a_state_item_whose_answer_is_As_next_token_is_laberror(smoke_gpt2):
    # by words: the question (what follows A's hand-off point) starts with the answer
    with pytest.raises(LabError, match="must not be A's next token"):
        H.Item("On Monday at dawn, Mara the baker felt calm.", " Mara walked to the harbor and", "Mara",
               "persona_state", state=True)
    # by tokens: the words differ, but the question's first token is the answer's
    it = H.Item("On Monday at dawn, Mara the baker felt calm.", " Mara's day began and the sunrise made", "Mara",
                "persona_state", state=True)
    assert smoke_gpt2.tokenizer.encode(" Mara's", add_special_tokens=False)[0] == \
        smoke_gpt2.tokenizer.encode(" Mara", add_special_tokens=False)[0]
    with pytest.raises(LabError, match="must not be A's next token"):
        H.encode_items(smoke_gpt2, [it])
    # the same words in a next-token task are what that task is
    H.encode_items(smoke_gpt2, [H.Item(it.material, it.question, "Mara", "persona")])


def test_commonest_answer_guess_is_picked_on_training_items_not_test_labels():
    test = H.make_items(60, "test", 0)
    train = H.make_items(500, "train", 0)
    golds = [it.answer for it in test]
    answers = {arm: [""] * len(test) for arm in ("session_a", "wrong_session", "none")}
    correct = {arm: np.zeros(len(test), bool) for arm in answers}
    res = H.HandoffResult(test, answers, correct)
    fair = H.handoff_measures(res, guess_items=train)[-1]
    top = H.commonest_answer(train)
    train_golds = [it.answer for it in train]
    assert train_golds.count(top) == max(train_golds.count(g) for g in train_golds)
    assert fair.extra == {"guess": top, "picked_on": "training items"} and "500 training golds" in fair.name
    assert fair.n == 60 and fair.value == golds.count(top) / 60
    oracle = H.handoff_measures(res)[-1]  # without training items: the test labels' own mode, named as an oracle
    assert "oracle" in oracle.name and oracle.value == max(golds.count(g) for g in golds) / 60 >= fair.value
    assert H.commonest_answer(list(reversed(train))) == top  # ties do not depend on order
    with pytest.raises(LabError, match="at least one item"):
        H.commonest_answer([])
    cfg = Config.preset("smoke")  # what the report, app and notebook pick on: training items, at least 500
    picked = H.guess_items_for(cfg, 60, 0, "pointer")
    assert len(picked) == 500 and picked == H.items_for(cfg, 500, "train", 0, "pointer")
    assert not {it.a_prompt for it in picked} & {it.a_prompt for it in H.items_for(cfg, 60, "test", 0, "pointer")}


def test_scoring_per_task():
    p = H.Item("K = walnut.", " What is K?\nAnswer:", "walnut", "pointer")
    assert p.score(" walnut.\nWhat") == "walnut" and p.score(" walnut walnut.") != "walnut"
    q = H.Item("On Monday at dawn, Mara the baker felt calm.", " It was 3 o'clock and the sunrise made", "Mara", "persona")
    assert q.score(" Mara feel calm.") == "Mara" and q.score(" Mara, then") == "Mara" and q.score("") == ""
    with pytest.raises(LabError, match="unknown hand-off task"):
        H.make_items(3, "test", 0, "riddles")


def test_empty_sessions_are_laberror(smoke_gpt2, trained):
    link = trained[2]
    with pytest.raises(LabError, match="empty session"):
        H.encode_items(smoke_gpt2, [])
    with pytest.raises(LabError, match="empty session"):
        H.run_session_a(smoke_gpt2, link, [H.Item("  ", " What is K?\nAnswer:", "walnut")], 2)
    with pytest.raises(LabError, match="empty session"):
        H.greedy_answers(smoke_gpt2, [torch.zeros(0, smoke_gpt2.d_model)], 3)
    with pytest.raises(LabError, match="need n >= 1"):
        H.make_items(0)


def test_wrong_width_handoff_is_laberror(smoke_gpt2, trained):
    items = H.make_items(3, "test", 0)
    _, q = H.encode_items(smoke_gpt2, items)
    bad = [torch.randn(2, smoke_gpt2.d_model + 3) for _ in items]
    with pytest.raises(LabError, match=f"width d={smoke_gpt2.d_model}"):
        H.answer_with_handoffs(smoke_gpt2, items, q, bad)
    with pytest.raises(LabError, match="shape"):
        H.nearest_tokens(smoke_gpt2, torch.randn(7))
    wide = InnerLink(smoke_gpt2.d_model * 2)
    with pytest.raises(LabError, match="width"):
        H.run_session_a(smoke_gpt2, wide, items, 2)


def test_arms_are_the_controls_they_claim(smoke_gpt2, trained):
    link = trained[2]
    items = H.make_items(10, "test", 1)
    a = H.run_session_a(smoke_gpt2, link, items, 3)
    arms = H.arm_handoffs(smoke_gpt2, a, seed=0)
    assert set(arms) == set(H.ARMS)
    assert all(x.shape == (0, smoke_gpt2.d_model) for x in arms["none"])
    for i in range(len(items)):
        torch.testing.assert_close(arms["random"][i].norm(dim=-1), a.latents[i].norm(dim=-1))
        assert not torch.equal(arms["wrong_session"][i], a.latents[i])           # never its own latent
        assert any(torch.equal(arms["wrong_session"][i], a.latents[j]) for j in range(len(items)))
        torch.testing.assert_close(arms["inner_link"][i], a.latents[i])
        # the continuation arm: the embeddings of A's own next m greedy tokens, no question
        torch.testing.assert_close(arms["continuation"][i], smoke_gpt2.embed(a.continuation[i]))
    seq = smoke_gpt2.tokenizer.encode(items[0].a_prompt, add_special_tokens=False)
    for t in a.continuation[0].tolist():  # greedy, one token at a time, from A's hand-off point
        nxt = int(smoke_gpt2.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        assert nxt == t
        seq.append(nxt)
    p = H.derangement(50, np.random.default_rng(0))
    assert sorted(p) == list(range(50)) and not np.any(p == np.arange(50))


def test_greedy_decoding_matches_hf_and_batching_does_not_leak(smoke_gpt2):
    """B's decoder (ragged, right-padded embedding batches) equals HF greedy generation row by row."""
    assert H.normalize_answer(" K  walnut.\nWhat") == "K walnut"
    items = H.make_items(3, "test", 2, "pointer") + H.make_items(3, "test", 2, "persona")
    a_ids, _ = H.encode_items(smoke_gpt2, items)
    for it, x in zip(items, a_ids):  # A's prompt is tokenized as the plain text would be
        assert x.tolist() == smoke_gpt2.tokenizer.encode(it.a_prompt, add_special_tokens=False)
    seqs = [smoke_gpt2.embed(x) for x in a_ids]
    batched = H.greedy_answers(smoke_gpt2, seqs, 5)
    single = [H.greedy_answers(smoke_gpt2, [s], 5)[0] for s in seqs]
    assert batched == single
    for it, got in zip(items, batched):
        ref = smoke_gpt2.generate(it.a_prompt, max_new_tokens=5)
        assert H.normalize_answer(got) == H.normalize_answer(ref)


def test_benchmark_reports_every_arm_with_n_ci_and_mcnemar(smoke_gpt2, trained):
    link = trained[2]
    items = H.make_items(16, "test", 0)
    res = H.run_benchmark(smoke_gpt2, link, items, 2, seed=0, extra_maps={"recon": link})
    summary = res.summary()
    for r in summary:  # the summary's continuity rate is the mean of the per-item agreement it reports
        per_item = res.agreement(r["arm"])
        assert per_item.shape == (16,) and r["agrees_with_A"] == per_item.mean()
    arms = {m.extra.get("arm"): m for m in res.measures if m.extra.get("arm")}
    assert set(arms) == set(H.ARMS) | {"recon", "session_a"}
    for arm, m in arms.items():
        assert m.n == 16 and m.ci_low <= m.value <= m.ci_high
        if arm != "wrong_session":
            assert m.control == "wrong-session latent" and m.test == "exact McNemar" and 0 <= m.p_value <= 1
    # same map => the recon arm's answers equal the inner-link arm's
    assert res.answers["recon"] == res.answers["inner_link"]
    rows = res.rows()
    assert len(rows) == 16 and {"material", "gold", "inner_link", "text"} <= set(rows[0])
    near = H.nearest_tokens(smoke_gpt2, res.latents[0, 0], k=5)
    assert len(near) == 5 and near[0][1] >= near[-1][1]
    # the diagnostic rows: per item, the first latent's nearest token against the gold's first token
    diag = {m.extra["diagnostic"]: m for m in res.measures if m.extra.get("diagnostic")}
    assert set(diag) == {"first_latent_nearest_is_gold", "a_next_token_is_gold"}
    gold = [smoke_gpt2.tokenizer.encode(" " + it.answer, add_special_tokens=False)[0] for it in items]
    emb = torch.nn.functional.normalize(smoke_gpt2.embed.weight.float(), dim=-1)
    want = [int((emb @ torch.nn.functional.normalize(res.latents[i, 0].float(), dim=0)).argmax()) == gold[i]
            for i in range(16)]
    assert diag["first_latent_nearest_is_gold"].value == np.mean(want)
    assert diag["first_latent_nearest_is_gold"].test == "exact McNemar"


def test_state_benchmark_and_open_set_arms(smoke_gpt2, trained):
    link = trained[2]
    items = H.make_items(12, "test", 0, "persona_state", answers=H.PERSONA_HALVES[1])
    res = H.run_benchmark(smoke_gpt2, link, items, 2, seed=0, extra_maps={"recon_open": link},
                          arms=("inner_link", "recon_open"))
    assert set(res.correct) == {"session_a", "wrong_session", "inner_link", "recon_open"}
    assert res.answers["recon_open"] == res.answers["inner_link"]
    # the hand-off point is the end of the material: A's first latent is the rollout from there
    a_ids, q_ids = H.encode_items(smoke_gpt2, items)
    h_ids = H.handoff_ids(a_ids, q_ids, items)
    assert all(len(h) == len(a) - len(q) for h, a, q in zip(h_ids, a_ids, q_ids))
    lat, _ = H.ragged_rollout(smoke_gpt2, link, [smoke_gpt2.embed(h_ids[0])], 2)
    torch.testing.assert_close(res.latents[0], lat[0])
    assert res.rows()[0]["hands_off_after"] == "material"
    with pytest.raises(LabError, match="unknown hand-off arm"):
        H.run_benchmark(smoke_gpt2, link, items[:3], 1, arms=("telepathy",))


# --- state reconstruction ------------------------------------------------------------------------

def test_recon_objective_trains_the_map_and_is_saved(smoke_gpt2, trained, tmp_path):
    from lab.innerlink import reconstruct as RC
    cfg, _, link = trained
    cfg = cfg.with_(recon_steps=8, recon_batch=4, handoff_steps=2, recon_lr=3e-3)
    items = H.make_items(5, "val", 9)
    # gradients reach the map through frozen B and A's rollout, and only the map
    rmap = InnerLink(smoke_gpt2.d_model)
    rmap.load_state_dict(link.state_dict())
    loss = RC.recon_loss(smoke_gpt2, rmap, items, 2)
    loss.backward()
    assert 0 <= float(loss.detach()) <= 2 and rmap.w1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in smoke_gpt2.model.parameters())
    test_items = H.make_items(20, "test", 0)
    art = RC.train_recon(cfg, smoke_gpt2, link, test_items, out_dir=tmp_path / "recon")
    m = art.manifest["metrics"]
    assert art.manifest["kind"] == "innerlink-recon" and len(m["history"]) >= 1
    assert m["history"][-1]["val_recon_cos"] > m["val_recon_cos_inner_link"]  # the objective it optimises
    r = RC.load_recon(tmp_path / "recon", smoke_gpt2)
    assert r.artifact.path == tmp_path / "recon" and r.config == cfg
    assert RC.recon_cosines(smoke_gpt2, r, items, 2).shape == (5,)


def test_recon_for_finds_the_map_made_for_this_link_by_config_not_by_folder_name(smoke_gpt2, trained, tmp_path):
    """The app's inner-link page shows the reconstruction arm only with a map trained from this link."""
    import shutil

    from lab import models_dir
    from lab.innerlink import reconstruct as RC
    from lab.innerlink.config import LINK_FIELDS
    from lab.innerlink.reconstruct import recon_for
    from lab.store import read_json, write_json
    cfg, art, link = trained
    RC.train_recon(cfg.with_(recon_steps=2, recon_batch=4, handoff_steps=2), smoke_gpt2, link,
                   H.make_items(8, "test", 0), out_dir=tmp_path / "recon")
    want = read_json(art.path / "config.json")
    # a map from another link (a link field differs), under the name a folder-name rule would pick
    other = models_dir() / art.path.name.replace("innerlink-", "innerlink-recon-", 1)
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(tmp_path / "recon", other)
    write_json(other / "config.json", {**read_json(other / "config.json"), "seed": want["seed"] + 1})
    found = recon_for(link, smoke_gpt2)
    assert found != other
    mine = models_dir() / "innerlink-recon-mine-smoke-gpt2"
    shutil.copytree(tmp_path / "recon", mine)
    found = recon_for(link, smoke_gpt2)
    assert found is not None and found != other
    assert all(read_json(found / "config.json").get(f) == want.get(f) for f in LINK_FIELDS)
    write_json(mine / "config.json", want)  # one with exactly the link's config is preferred
    assert recon_for(link, smoke_gpt2) == mine
    # the base re-pretrained under the same name: no map made on the previous weights is offered
    import copy
    retrained = copy.copy(smoke_gpt2)
    retrained.__dict__["fingerprint"] = "f" * 64
    assert recon_for(link, retrained) is None
    shutil.rmtree(other)
    shutil.rmtree(mine)


# --- half precision ----------------------------------------------------------------------------------

def test_half_precision_base_end_to_end(smoke_gpt2, tmp_path):
    """A bfloat16 base (the paper preset's Qwen2.5-14B only fits in half precision): the float32 adapter
    trains on its cached states, and the cosine evaluation, the m-step rollout, the hand-off benchmark
    and the reconstruction objective run end to end, with latents in the base's dtype."""
    from lab.bases import load_base
    from lab.innerlink import reconstruct as RC
    from lab.innerlink.cache import caches
    from lab.innerlink.evaluate import cosine_measures, heldout_cosines, rollout_eval
    from lab.innerlink.model import latent_rollout
    from lab.innerlink.train import load, train
    b16 = load_base(smoke_gpt2.path, device=smoke_gpt2.device, dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16
    d = b16.d_model
    cfg = small_config(train_docs=40, heldout_docs=12, steps=4, batch_size=32, eval_rows=64, rollout_prompts=4)
    art = train(cfg, b16, out_dir=tmp_path / "link")
    link = load(art.path, b16)
    assert all(p.dtype == torch.float32 for p in link.parameters())
    assert np.isfinite(art.manifest["metrics"]["history"][-1]["heldout_cos"])
    # the adapter computes in float32 and hands back the dtype it was given
    h = torch.randn(3, d, dtype=torch.bfloat16, device=b16.device)
    assert link(h).dtype == torch.bfloat16 and link(h.float()).dtype == torch.float32
    # held-out cosines (cached float32 states; the head and the embedding matrix are bfloat16)
    _, held = caches(cfg, b16)
    cos = heldout_cosines(link, b16, held)
    for k in ("trained", "shuffled", "identity", "untrained", "nearest_ok", "base_top1_ok"):
        assert cos[k].shape == (len(held),) and cos[k].dtype == np.float32 and np.isfinite(cos[k]).all(), k
    assert all(np.isfinite(m.value) for m in cosine_measures(cos))
    # the m-step rollout feeds the latents back as input embeddings of the base's dtype
    ids = torch.tensor([b16.tokenizer.encode("K = walnut. What is K?", add_special_tokens=False)], device=b16.device)
    lat, raw = latent_rollout(b16, link, b16.embed(ids), 2)
    assert lat.shape == raw.shape == (1, 2, d) and lat.dtype == torch.bfloat16
    table, _ = rollout_eval(link, b16, cfg)
    assert [r["step"] for r in table] == list(range(1, cfg.rollout_steps + 1))
    assert all(np.isfinite(r["cos_gold"]) and np.isfinite(r["nearest_is_greedy"]) for r in table)
    # the hand-off benchmark on a few items, with a second map's arm
    items = H.make_items(4, "test", 0)
    res = H.run_benchmark(b16, link, items, 2, seed=0, extra_maps={"recon": link})
    assert res.latents.shape == (4, 2, d) and torch.isfinite(res.latents.float()).all()
    arms = {m.extra.get("arm"): m for m in res.measures if m.extra.get("arm")}
    assert set(arms) == set(H.ARMS) | {"recon", "session_a"} and all(m.n == 4 for m in arms.values())
    assert res.answers["recon"] == res.answers["inner_link"]
    # the reconstruction objective: a finite loss whose gradient reaches the float32 map
    rmap = InnerLink(d).to(b16.device)
    rmap.load_state_dict(link.state_dict())
    loss = RC.recon_loss(b16, rmap, items[:2], 2)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and rmap.w1.weight.grad.dtype == torch.float32
    assert torch.isfinite(rmap.w1.weight.grad).all() and rmap.w1.weight.grad.abs().sum() > 0
    rc = RC.recon_cosines(b16, link, items, 2)
    assert rc.shape == (4,) and np.isfinite(rc).all()


# --- evaluate, CLI, app -----------------------------------------------------------------------------

def test_evaluate_report_answers_published_figures(trained, smoke_gpt2):
    from lab.innerlink import evaluate, load
    cfg, art, link = trained
    small = load(art.path, smoke_gpt2)
    small.config = small.config.with_(handoff_items=12)  # the sizes come from the link's config
    rep = evaluate(small, smoke_gpt2, recon=link, recon_open=link)
    state = "state hand-off (persona, A hands off before the question) exact match: "
    nxt = "next-token hand-off (persona, A hands off after the question) exact match: "
    assert rep.measure(state + "inner-link latent").n == 12
    assert rep.published["inner-link mean cos(R_in(h_t), Emb(y_t+1))"].value == "0.74"
    assert rep.published["control cos(R_in(h_t), Emb(random other token))"].value == "≈0.005"
    # the published 0 of 18 sits beside the state task only
    assert rep.published[state + "inner-link latent"].value == "0 of 18"
    assert [k for k, v in rep.published.items() if v.value == "0 of 18"] == [state + "inner-link latent"]
    for arm in ("no hand-off", "random vectors (norm-matched)", "A's raw hidden states", "text hand-off (A's words)",
                "A's next m greedy tokens (no question)"):
        assert rep.measure(state + arm).test == "exact McNemar" and rep.measure(nxt + arm).n == 12
    assert any(m.name.startswith("open-set reconstruction") for m in rep.measures)
    assert {"innerlink_cosine", "innerlink_rollout", "innerlink_handoff", "innerlink_handoff_persona",
            "innerlink_handoff_pointer"} <= set(rep.figures)
    assert "|" in rep.to_markdown() and all(m.n > 0 for m in rep.measures)


def test_cli_train_and_evaluate(lab_home, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from lab.cli import app
    from lab.innerlink.config import Config as C
    orig = C.preset
    monkeypatch.setattr(C, "preset", classmethod(lambda cls, name, **kw: orig.__func__(
        cls, name, **{**dict(train_docs=60, heldout_docs=20, steps=4, batch_size=32, rollout_prompts=8,
                          handoff_items=200, recon_steps=2, recon_batch=2),
                      **{k: v for k, v in kw.items() if v is not None}})))
    from lab import models_dir
    r = CliRunner().invoke(app, ["train", "innerlink", "--preset", "smoke"])
    assert r.exit_code == 0, r.output
    assert "2d²+6d" in r.output and "reconstruction map" in r.output
    # training again reuses both the link and the reconstruction map made for this config
    made = {d: (models_dir() / d / "manifest.json").stat().st_mtime_ns
            for d in ("innerlink-smoke-smoke-gpt2", "innerlink-recon-smoke-smoke-gpt2")}
    r = CliRunner().invoke(app, ["train", "innerlink", "--preset", "smoke"])
    assert r.exit_code == 0, r.output
    assert made == {d: (models_dir() / d / "manifest.json").stat().st_mtime_ns for d in made}
    r = CliRunner().invoke(app, ["evaluate", "innerlink", "--preset", "smoke", "--items", "10", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "hand-off exact match: inner-link latent" in r.output and "pointer-chain hand-off" in r.output and (tmp_path / "report.md").exists()


def test_app_page(lab_home, trained):
    from streamlit.testing.v1 import AppTest
    page = Path(__file__).resolve().parents[1] / "app" / "pages" / "3_Inner_Link.py"
    at = AppTest.from_file(str(page), default_timeout=240)
    at.run()
    assert not at.exception, at.exception
    before = [m.value for m in at.markdown]
    item_box = at.slider(key="il-item")
    item_box.set_value(item_box.value + 1).run()
    assert not at.exception, at.exception
    after = [m.value for m in at.markdown]
    assert after != before
    assert at.get("plotly_chart")
