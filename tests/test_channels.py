"""Proprioceptive channels: bit-identity at alpha = 0 on every family, encoders, corpus split, training,
evaluation metrics, bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import LabError
from lab.channels import ChannelInjector, ChannelState, Config, TextEncoder, build, inject
from lab.channels.data import (
    CAPABILITIES,
    CHANNEL_TEXTS,
    SELECTION,
    STATE_TEXTS,
    TEMPLATES,
    entities,
    entity_words,
    heldout_items,
    pool,
    sample_items,
    train_batch_items,
)
from lab.channels.encoders import ETHICS_CATEGORIES, channel_widths, encode_affect, encode_ethics, encode_states, encode_time
from lab.channels.injection import check_channel_values, concat_channel_values

PROMPTS = ["On Monday at dawn, Mara felt", "User: Can you help me with the market?\nAssistant: I would go"]


def _random_channels(widths, B, scale=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, w, generator=g) * scale for k, w in widths.items()}


# --- injection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["additive", "xattn"])
def test_alpha_zero_is_bit_identical_on_every_family(any_base, mode):
    b = any_base
    ids, mask = b.encode(PROMPTS)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    widths = channel_widths(b.d_model)
    inj = ChannelInjector(b.d_model, b.n_layers, widths, mode=mode, n_heads=4)
    for seed in range(3):  # random channel values, large and small
        ch = _random_channels(widths, 2, scale=10.0 ** (seed - 1), seed=seed)
        with inject(b, inj, ch, batch=2):
            got = b.model(input_ids=ids, attention_mask=mask).logits
        assert (got - ref).abs().max().item() == 0.0
    # the hooks are gone after the context, and opening a gate changes the output
    assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)
    with torch.no_grad():
        inj.alpha.fill_(0.5)
    with inject(b, inj, ch, batch=2):
        moved = b.model(input_ids=ids, attention_mask=mask).logits
    assert (moved - ref).abs().max().item() > 1e-3
    # zero channel inputs remove the contribution exactly, whatever alpha is
    zeros = {k: torch.zeros_like(v) for k, v in ch.items()}
    with inject(b, inj, zeros, batch=2):
        assert (b.model(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item() == 0.0


def test_each_channel_acts_only_through_its_own_gate(smoke_gpt2):
    b = smoke_gpt2
    ids, mask = b.encode(PROMPTS)
    widths = channel_widths(b.d_model)
    inj = ChannelInjector(b.d_model, b.n_layers, widths)
    ch = _random_channels(widths, 2)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        inj.alpha[:, inj.names.index("affect")] = 1.0
    only_affect = {"affect": ch["affect"]}
    with inject(b, inj, ch, batch=2):
        full = b.model(input_ids=ids, attention_mask=mask).logits
    with inject(b, inj, only_affect, batch=2):
        aff = b.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(full, aff)  # other channels have closed gates
    assert not torch.equal(aff, ref)


def test_injection_gradients_reach_alpha_only_and_base_stays_frozen(smoke_gpt2):
    b = smoke_gpt2
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    model = build(Config.preset("smoke"), b)
    items = train_batch_items(0, 8, seed=0)
    model.loss(items).backward()
    inj = model.injector
    assert inj.alpha.grad is not None and inj.alpha.grad.abs().sum() > 0
    # alpha = 0 => the projections get no gradient yet (ReZero: the gate opens first)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in inj.named_parameters() if n != "alpha")
    assert all(not p.requires_grad for p in b.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in b.model.state_dict().items())


def test_generation_with_closed_gates_equals_base_greedy(smoke_gpt2):
    b = smoke_gpt2
    model = build(Config.preset("smoke"), b)
    states = [ChannelState(affect=(1.0, 0.0), memory="the walnut")] * 2
    prompts = ["On Monday at dawn, Mara felt", "Mara"]
    got = model.generate(prompts, model.channels(states), max_new_tokens=5)
    assert got == [b.generate(p, max_new_tokens=5) for p in prompts]


def test_generation_without_early_exit_runs_every_forward_with_the_same_outputs(smoke_gpt2):
    """early_exit=False (the bench's equal-work arms): all max_new_tokens forwards, the same texts. A hook
    makes end-of-text every row's first token, so the default exits after one forward."""
    b = smoke_gpt2
    model = build(Config.preset("smoke"), b)
    ch = model.channels([ChannelState(affect=(1.0, 0.0))] * 2)
    prompts = ["On Monday at dawn, Mara felt", "Mara"]
    calls = []

    def end_of_text_first(module, args, output):
        calls.append(1)
        output.logits[..., b.tokenizer.eos_token_id] = 1e4
        return output
    handle = b.model.register_forward_hook(end_of_text_first)
    try:
        fixed = model.generate(prompts, ch, max_new_tokens=6, early_exit=False)
        n_fixed = len(calls)
        calls.clear()
        early = model.generate(prompts, ch, max_new_tokens=6)
        n_early = len(calls)
    finally:
        handle.remove()
    assert (n_fixed, n_early) == (6, 1)
    assert fixed == early


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_channel_values_are_lab_errors(smoke_gpt2):
    b = smoke_gpt2
    widths = channel_widths(b.d_model)
    inj = ChannelInjector(b.d_model, b.n_layers, widths)
    ids, mask = b.encode(PROMPTS)
    cases = {
        "wrong width": ({"affect": torch.zeros(2, 3)}, "shape"),
        "unknown name": ({"mood": torch.zeros(2, 2)}, "unknown channel"),
        "nan": ({"time": torch.full((2, 8), float("nan"))}, "NaN"),
        "inf": ({"ethics": torch.tensor([[float("inf")] + [0.0] * 5] * 2)}, "infinite"),
        "not a tensor": ({"affect": [0.1, 0.2]}, "torch.Tensor"),
        "int dtype": ({"affect": torch.zeros(2, 2, dtype=torch.long)}, "floating"),
        "batch mismatch": ({"affect": torch.zeros(3, 2)}, "batch"),
    }
    for name, (ch, msg) in cases.items():
        with pytest.raises(LabError, match=msg):
            with inject(b, inj, ch, batch=2):
                b.model(input_ids=ids, attention_mask=mask)
    with pytest.raises(LabError, match="injector built for"):
        with inject(b, ChannelInjector(b.d_model + 4, b.n_layers, widths), {}):
            pass
    with pytest.raises(LabError, match="mode"):
        ChannelInjector(8, 2, widths, mode="concat")
    with pytest.raises(LabError, match="width"):
        ChannelInjector(8, 2, {"affect": 0})
    with pytest.raises(LabError, match="divisible"):
        ChannelInjector(10, 2, {"affect": 2}, mode="xattn", n_heads=4)
    model = build(Config.preset("smoke"), b)
    state = [ChannelState(affect=(0.5, 0.0))]
    with pytest.raises(LabError, match="non-empty prompt strings, got ''"):
        model.generate([""], model.channels(state))
    with pytest.raises(LabError, match="longer than"):
        model.continuation_logprobs(["walnut " * 5000], [" walnut."], model.channels(state))


@pytest.mark.parametrize("call, msg", [
    (lambda: encode_time(24, 0), r"\[0, 24\)"),
    (lambda: encode_time(-1, 0), r"\[0, 24\)"),
    (lambda: encode_time(float("nan"), 0), "finite"),
    (lambda: encode_time(3, 7), "weekday"),
    (lambda: encode_time(3, "Funday"), "unknown weekday"),
    (lambda: encode_time("noon", 1), "number"),
    (lambda: encode_affect(1.5, 0), r"valence must be in \[-1, 1\]"),
    (lambda: encode_affect(0, -2), "arousal"),
    (lambda: encode_affect(float("inf"), 0), "finite"),
    (lambda: encode_ethics("reckless"), "unknown ethics posture"),
    (lambda: encode_ethics({"weather": "cautious"}), "unknown ethics categor"),
    (lambda: encode_ethics({"privacy": 3.0}), r"\[-1, 1\]"),
    (lambda: ChannelState.from_dict({"mood": 1}), "unknown channel"),
    (lambda: ChannelState.from_dict({"affect": 0.5}), "pair"),
    (lambda: ChannelState(affect=0.5), "pair"),           # the constructor checks too, not only from_dict
    (lambda: ChannelState(time=(8,)), r"\(hour, weekday\)"),
    (lambda: ChannelState(memory=3), "expects a text"),
    (lambda: ChannelState.from_dict("walnut"), "mapping"),
    (lambda: heldout_items("telepathy"), "unknown capability"),
    (lambda: pool("objects", "test"), "split"),
    (lambda: Config.preset("huge"), "unknown channels preset .huge."),
    (lambda: Config(mode="concat"), "mode"),
    (lambda: Config(capabilities=("memory", "telepathy")), "capabilities"),
    (lambda: Config(steps=0), "steps"),
])
def test_bad_state_values_are_lab_errors(call, msg):
    with pytest.raises(LabError, match=msg):
        call()


@settings(max_examples=60, deadline=None)
@given(v=st.floats(allow_nan=True, allow_infinity=True), a=st.floats(-1, 1))
def test_affect_accepts_exactly_the_unit_interval(v, a):
    if math.isfinite(v) and -1 <= v <= 1:
        assert torch.equal(encode_affect(v, a), torch.tensor([v, a], dtype=torch.float32))
    else:
        with pytest.raises(LabError):
            encode_affect(v, a)


@settings(max_examples=60, deadline=None)
@given(h=st.floats(0, 24, exclude_max=True), d=st.integers(0, 6))
def test_time_features_are_periodic_and_bounded(h, d):
    f = encode_time(h, d)
    assert f.shape == (8,) and torch.isfinite(f).all() and f.abs().max() <= 1.0 + 1e-6
    assert torch.allclose(f[0] ** 2 + f[1] ** 2, torch.tensor(1.0), atol=1e-5)
    # 23:59 sits next to 00:00 on the circle
    assert torch.allclose(encode_time(23.999, d)[:2], encode_time(0.0, d)[:2], atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(vals=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=2, max_size=2))
def test_check_channel_values_rejects_every_non_finite(vals):
    x = {"affect": torch.tensor(vals)}
    if all(math.isfinite(v) for v in vals):
        assert check_channel_values(x, {"affect": 2, "time": 8})["time"].shape == (1, 8)
    else:
        with pytest.raises(LabError, match="NaN or infinite"):
            check_channel_values(x, {"affect": 2})
    # the additive hot path's check (a finite sum first) agrees, including sums that overflow
    if all(math.isfinite(v) for v in vals):
        xc = concat_channel_values(x, {"time": 8, "affect": 2}, batch=3)
        assert xc.shape == (3, 10) and torch.equal(xc[:, 8:], torch.tensor(vals).expand(3, 2))
    else:
        with pytest.raises(LabError, match="'affect' holds"):
            concat_channel_values(x, {"time": 8, "affect": 2})


def test_numpy_scalars_are_numbers_for_the_encoders():
    assert torch.equal(encode_time(np.float32(8), np.int64(3)), encode_time(8.0, 3))
    assert torch.equal(encode_affect(np.float64(0.5), np.float32(-0.25)), encode_affect(0.5, -0.25))


def test_a_value_beyond_the_base_dtype_is_a_lab_error_not_inf():
    """1e5 is finite in float32 but inf in float16: a half-precision base must not receive inf."""
    x = {"affect": torch.tensor([1e5, 0.0])}
    for check in (check_channel_values, concat_channel_values):
        check(x, {"affect": 2})  # fine in float32
        with pytest.raises(LabError, match=r"'affect' holds a value of magnitude 1e\+05.*torch.float16"):
            check(x, {"affect": 2}, dtype=torch.float16)


def test_concat_channel_values_accepts_finite_values_whose_sum_overflows():
    big = torch.full((2, 8), 3e38)  # every value finite, the sum is inf
    assert torch.equal(concat_channel_values({"time": big}, {"affect": 2, "time": 8})[:, 2:], big)
    with pytest.raises(LabError, match="'time' holds 1 NaN"):
        concat_channel_values({"time": big.index_put((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan")))},
                              {"affect": 2, "time": 8})


# --- encoders ----------------------------------------------------------------------------------------

def test_text_encoder_base_mean_pool(smoke_gpt2):
    b = smoke_gpt2
    te = TextEncoder(b, "base", layer=0)
    e = te.encode(["the walnut", "the copper", "the walnut"])
    assert e.shape == (3, b.d_model)
    assert torch.allclose(e.norm(dim=-1), torch.full((3,), math.sqrt(b.d_model)), atol=1e-4)
    assert torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])
    # layer 0 mean pool = mean of the base's own embedding output (gpt2: token + position embeddings)
    ids, _ = b.encode("the walnut")
    manual = (b.embed(ids) + b.model.transformer.wpe(torch.arange(ids.shape[1])))[0].mean(0)
    assert torch.allclose(e[0], torch.nn.functional.normalize(manual, dim=0) * math.sqrt(b.d_model), atol=1e-5)
    assert TextEncoder(b, "base", layer=b.n_layers).encode(["x y"]).shape == (1, b.d_model)
    # the default: centred input embeddings, no positions
    e2 = TextEncoder(b).encode(["the walnut"])[0]
    tok = b.embed(ids)[0].mean(0) - b.embed.weight.mean(0)
    assert torch.allclose(e2, torch.nn.functional.normalize(tok, dim=0) * math.sqrt(b.d_model), atol=1e-5)
    with pytest.raises(LabError, match="text_layer"):
        TextEncoder(b, "base", layer=b.n_layers + 1)
    with pytest.raises(LabError, match="non-empty"):
        te.encode(["  "])


def test_sentence_transformers_option_is_a_clear_error_offline(smoke_gpt2):
    with pytest.raises(LabError, match="sentence-transformers|not available offline"):
        TextEncoder(smoke_gpt2, "st:no-such-org/no-such-model")
    with pytest.raises(LabError, match="'base' or 'st:"):
        TextEncoder(smoke_gpt2, "bge")


def test_encode_states_none_is_zero_and_postures_are_named(smoke_gpt2):
    te = TextEncoder(smoke_gpt2)
    x = encode_states([ChannelState(affect=(0.5, -0.5), ethics="cautious", time=(8, "Tuesday")),
                       {"identity": "I am Mara, a baker.", "ethics": {"privacy": "permissive"}}], te)
    assert set(x) == {"memory", "affect", "time", "ethics", "identity", "continuity"}
    assert torch.equal(x["memory"], torch.zeros(2, smoke_gpt2.d_model))
    assert torch.equal(x["affect"][1], torch.zeros(2)) and torch.equal(x["affect"][0], torch.tensor([0.5, -0.5]))
    assert torch.equal(x["ethics"][0], torch.ones(len(ETHICS_CATEGORIES)))
    assert x["ethics"][1].tolist() == [(-1.0 if c == "privacy" else 0.0) for c in ETHICS_CATEGORIES]
    assert x["identity"][1].abs().sum() > 0 and x["identity"][0].abs().sum() == 0


# --- corpus ------------------------------------------------------------------------------------------

def test_heldout_split_is_disjoint_and_large_enough():
    assert not entities("train") & entities("heldout")
    assert not entity_words("train") & entity_words("heldout")
    for cap in CAPABILITIES:
        assert not set(TEMPLATES[cap]["train"]) & set(TEMPLATES[cap]["heldout"])
        if cap in CHANNEL_TEXTS:
            assert not set(CHANNEL_TEXTS[cap]["train"]) & set(CHANNEL_TEXTS[cap]["heldout"])
        # the state as text (the text arm's prefix) is split too, and never names a candidate itself
        frames = {sp: {f for fr in STATE_TEXTS[cap][sp] for f in (fr if isinstance(fr, tuple) else (fr,))}
                  for sp in ("train", "heldout")}
        assert not frames["train"] & frames["heldout"]
        pool_words = entity_words("train") | entity_words("heldout")
        for f in frames["train"] | frames["heldout"]:
            assert not set(re.findall(r"[a-z']+", f.lower())) & pool_words, (cap, f)
        ho = heldout_items(cap, 240)
        assert len(ho) >= 200
        # no duplicates, not even in content alone (the same prompt, candidates and marked item, worded otherwise)
        assert len({(i.prompt, i.label, tuple(i.candidates)) for i in ho}) == len(ho)
        assert all(i.split == "heldout" and i.template.startswith(f"{cap}/heldout/") for i in ho)
        tr = sample_items(cap, "train", 200, seed=1)
        # no held-out entity word ever appears in a training prompt, target or channel text
        ho_only = entity_words("heldout")
        for it in tr:
            words = set(re.findall(r"[a-z']+", (it.prompt + it.target + it.response + repr(it.state)).lower()))
            assert not words & ho_only, (cap, it.prompt, words & ho_only)
        # the held-out state texts use held-out frames only, and the two poles of a register pair state opposite states
        pattern = {sp: [re.sub(r"\\\{\w+\\\}", ".+", re.escape(f)) for f in frames[sp]] for sp in frames}
        for i in ho:
            assert any(re.fullmatch(p, i.text_state) for p in pattern["heldout"]), i.text_state
            assert not any(re.fullmatch(p, i.text_state) for p in pattern["train"]), i.text_state
            assert any(re.fullmatch(p, i.text_state_trained_frame) for p in pattern["train"]), i.text_state_trained_frame
            assert i.text_state != i.text_state_trained_frame
            if cap in SELECTION:  # the channel's own control: the marked entity, its text in a training frame
                ctexts = {sp: [re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) for t in CHANNEL_TEXTS[cap][sp]] for sp in frames}
                seen = i.state_trained_frame[cap]
                assert any(re.fullmatch(p, seen, re.S) for p in ctexts["train"]), seen
                assert any(re.fullmatch(p, i.state[cap], re.S) for p in ctexts["heldout"]), i.state[cap]
                assert i.keys[i.label][0] in seen
        if cap not in SELECTION:
            by_pair = {}
            for i in ho:
                by_pair.setdefault(i.pair, {})[i.pole] = i.text_state
            assert all(v[1] != v[-1] for v in by_pair.values())
        # content verbatim in the prompt: every selection candidate is in the prompt
        if cap in SELECTION:
            assert all(all(k[0] in i.prompt for k in i.keys) for i in ho)
            # the prompt alone does not give the label away: marked positions are balanced
            counts = np.bincount([i.label for i in ho], minlength=3)
            assert counts.min() > len(ho) / 6
        else:
            pairs = {}
            for i in ho:
                pairs.setdefault(i.pair, []).append(i)
            assert all(len(v) == 2 and v[0].prompt == v[1].prompt and {v[0].pole, v[1].pole} == {1, -1}
                       for v in pairs.values())


def test_training_batches_are_deterministic_and_mixed():
    a = train_batch_items(5, 32, seed=0)
    b = train_batch_items(5, 32, seed=0)
    assert [i.to_dict() for i in a] == [i.to_dict() for i in b]
    assert [i.to_dict() for i in a] != [i.to_dict() for i in train_batch_items(6, 32, seed=0)]
    assert len({i.capability for i in a}) >= 4
    assert all(i.split == "train" for i in a)


# --- metrics -----------------------------------------------------------------------------------------

def test_judge_free_scorers():
    from lab.channels.evaluate import dominant, lexicon_score
    keys = [["walnut"], ["copper"], ["maple"]]
    assert dominant("the walnut and the walnut, then copper", keys, 0)
    assert not dominant("the walnut and copper", keys, 0)          # a tie is not dominance
    assert not dominant("walnuts everywhere", keys, 0)               # whole words only
    assert lexicon_score("I would go carefully, with caution", "ethics") == 2
    assert lexicon_score("I would go right away, boldly", "ethics") == -2
    assert lexicon_score("without hesitation", "ethics") == -1      # the phrase, not a cautious word inside it
    assert lexicon_score("breakfast at sunrise", "time") == 2
    assert lexicon_score("stars and moonlight at night", "time") == -3
    assert lexicon_score("she felt joyful and happy", "affect") > 0 > lexicon_score("she felt miserable", "affect")
    with pytest.raises(LabError):
        lexicon_score("x", "memory")


# --- training, artifacts, evaluation (smoke) ----------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_artifacts(smoke_gpt2, tmp_path_factory):
    from lab.channels import train_controls, train_or_load
    cfg = Config.preset("smoke", steps=12, eval_every=4, n_heldout=6, native_steps=4, native_docs=500,
                        adapter_seeds=2, compare_modes=("xattn",))
    model = train_or_load(cfg, smoke_gpt2, force=True)
    controls = train_controls(cfg, smoke_gpt2, force=True)
    return cfg, {"adapter": model.artifact, "text": controls.text, "native": controls.native, "seeds": controls.seeds,
                 "modes": controls.modes}


def test_train_artifact_roundtrip_and_alpha_history(smoke_gpt2, smoke_artifacts):
    from lab.channels import load
    cfg, arts = smoke_artifacts
    art = arts["adapter"]
    assert (art.path / "weights.safetensors").exists() and art.kind == "channels-adapter"
    m = load(art.path, smoke_gpt2)
    assert m.config == Config.from_dict(art.config) and m.artifact.path == art.path
    assert m.injector.alpha.abs().max() > 0                         # the gates opened
    hist = art.manifest["metrics"]["alpha_history"]
    assert [h["step"] for h in hist] == [4, 8, 12]
    assert torch.allclose(torch.tensor(hist[-1]["alpha"]), m.injector.alpha)
    assert torch.equal(torch.tensor(hist[0]["alpha"]).abs().sum() > 0, torch.tensor(True))
    # the text arm: LoRA sized like the injector, its weights alone in the artifact; the native track has 3
    # models bracketing params
    text = arts["text"]
    assert text.kind == "channels-text-arm" and all("lora_" in k for k in text.tensors)
    mt = text.manifest["metrics"]
    assert abs(mt["n_params"] - mt["channel_arm_params"]) <= mt["n_params"] / mt["lora_rank"] / 2
    assert mt["channel_arm_params"] == m.adapter.n_params() and mt["lr"] == cfg.text_lr
    tm = load(text.path, smoke_gpt2)
    assert any(p.abs().max() > 0 for k, p in tm.adapter.state_dict().items() if "lora_B" in k)  # it trained
    # ... once per training seed (smoke: 2), each seed its own initialisation, in its own directories
    from lab.channels.train import load_native, native_run_dirs
    assert arts["native"] == native_run_dirs(cfg) and len(arts["native"]) == cfg.native_seeds == 2
    runs = [{k: load_native(p, smoke_gpt2) for k, p in run.items()} for run in arts["native"]]
    for run in runs:
        n = {k: m.meta["n_params"] for k, m in run.items()}
        assert n["baseline-small"] < n["channels"] < n["baseline-large"]
        # the width-matched baseline: the channel model's width, no channels (so fewer parameters)
        assert run["baseline-width"].cm is None and run["channels"].cm is not None
        assert run["baseline-width"].lm.config.n_embd == run["channels"].lm.config.n_embd == cfg.native_d
    # the further adapter seed (with its text arm) and the xattn mode, each its own artifact
    (a1, t1), = arts["seeds"]
    assert a1.config["seed"] == cfg.seed + 1 and t1.config["seed"] == cfg.seed + 1 and t1.kind == "channels-text-arm"
    assert arts["modes"]["xattn"].config["mode"] == "xattn" and arts["modes"]["xattn"].config["lr"] == cfg.lr
    assert arts["modes"]["xattn"].manifest["metrics"]["lr"] == cfg.xattn_lr
    assert [run["channels"].config.seed for run in runs] == [cfg.seed, cfg.seed + 1]
    w0, w1 = (run["baseline-small"].lm.transformer.wte.weight for run in runs)
    assert w0.shape == w1.shape and not torch.equal(w0, w1)


def test_injector_param_count_matches_the_built_injector():
    widths = channel_widths(48)
    for mode in ("additive", "xattn"):
        assert ChannelInjector.param_count(64, 3, widths, mode, 2) == ChannelInjector(64, 3, widths, mode, 2).n_params()


def test_text_arm_is_lora_sized_like_the_injector_on_a_private_copy(any_base):
    """The text arm's trainable part matches the channel arm's size, starts exactly at the base, reads the state
    text in its prompt, and never touches the shared base (peft edits the modules it wraps)."""
    cfg = Config.preset("smoke", base=any_base.name)
    channel, text = build(cfg, any_base), build(cfg, any_base, arm="text")
    names, per_rank, _ = __import__("lab.channels.model", fromlist=["lora_sites"]).lora_sites(any_base.model)
    assert text.adapter.n_params() == text.text_lora.rank * per_rank
    assert abs(text.adapter.n_params() - channel.adapter.n_params()) <= per_rank / 2
    assert text.channels([ChannelState(memory="x")]) is None and text.injector is None
    assert {n for n, p in text.named_parameters()} == {f"text_lora.weights.{k}" for k in text.text_lora.weights}
    ids = torch.tensor([any_base.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(text.lm(input_ids=ids).logits, any_base.model(input_ids=ids).logits)  # B = 0 at init
        for k, p in text.adapter.state_dict().items():
            if "lora_B" in k:
                p.normal_()
        assert not torch.equal(text.lm(input_ids=ids).logits, any_base.model(input_ids=ids).logits)
    # the base's own modules are unwrapped and its weights still its own
    assert not any("lora" in n for n, _ in any_base.model.named_parameters())
    items = heldout_items("memory", 2)
    assert text.prompt_of(items[0]) == items[0].text_state + items[0].prompt
    assert channel.prompt_of(items[0]) == items[0].prompt


@pytest.mark.parametrize("arm", ["channel", "text"])
def test_train_resume_is_exact(smoke_gpt2, tmp_path, arm):
    from lab.channels import train
    cfg = Config.preset("smoke", steps=6, eval_every=3)
    full = train(cfg, smoke_gpt2, out_dir=tmp_path / "a", force=True, arm=arm)
    assert train(cfg, smoke_gpt2, out_dir=tmp_path / "b", stop_after=3, force=True, arm=arm) is None
    resumed = train(cfg, smoke_gpt2, out_dir=tmp_path / "b", force=True, arm=arm)
    for k in full.tensors:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k
    assert full.manifest["metrics"]["alpha_history"] == resumed.manifest["metrics"]["alpha_history"]
    # without force the adapter on disk is reused, unless the base was re-pretrained under the same name:
    # then it counts as missing and is retrained on the new base, not refused at load
    import copy
    assert train(cfg, smoke_gpt2, out_dir=tmp_path / "a", arm=arm).manifest == full.manifest
    # the other arm's learning rate is not this arm's config: changing it reuses the artifact
    other = Config.preset("smoke", steps=6, eval_every=3, **({"text_lr": 7e-3} if arm == "channel" else {"lr": 7e-2}))
    assert train(other, smoke_gpt2, out_dir=tmp_path / "a", arm=arm).manifest == full.manifest
    retrained = copy.copy(smoke_gpt2)
    retrained.__dict__["fingerprint"] = "f" * 64
    again = train(cfg, retrained, out_dir=tmp_path / "a", arm=arm)
    assert again.manifest["base"]["fingerprint"] == "f" * 64 and again.manifest["base"]["name"] == "smoke-gpt2"


def test_artifact_on_another_base_is_refused(smoke_artifacts, smoke_mamba2):
    from lab.channels import evaluate, load
    _, arts = smoke_artifacts
    with pytest.raises(LabError, match="trained on base"):
        evaluate(load(arts["adapter"].path, smoke_mamba2))


def test_register_outcomes_count_prompt_pairs_not_poles():
    """The two poles of a register prompt share it and its candidates: one unit, right when both poles are."""
    from lab.channels.data import heldout_items
    from lab.channels.evaluate import per_unit, unit_chance
    items = heldout_items("affect", 5, seed=0)
    assert len(items) == 10 and len({it.pair for it in items}) == 5
    pairs = [it.pair for it in items]
    ok = np.array([True] * 10)
    first_pole = np.array([pairs.index(p) == i for i, p in enumerate(pairs)])  # one pole of every pair right
    assert per_unit(items, ok).tolist() == [True] * 5 and not per_unit(items, first_pole).any()
    assert unit_chance(items) == 0.25
    sel = heldout_items("memory", 4, seed=0)
    assert per_unit(sel, np.ones(4, bool)).tolist() == [True] * 4 and unit_chance(sel) == pytest.approx(1 / 3)
    with pytest.raises(LabError, match="do not have exactly two poles"):
        per_unit(items[:3], ok[:3])
    with pytest.raises(LabError, match="3 outcomes for 10 items"):
        per_unit(items, ok[:3])


def test_evaluate_reports_every_capability_with_n_and_p(smoke_gpt2, smoke_artifacts, tmp_path):
    from lab.channels import evaluate, load, write_lexicons
    from lab.channels.evaluate import REPORTED_TESTS
    cfg, arts = smoke_artifacts
    rep = evaluate(load(arts["adapter"], smoke_gpt2), text_artifact=arts["text"], native_runs=arts["native"],
                   seeds=arts["seeds"], modes=arts["modes"], log=lambda s: None)
    named = {m.name: m for m in rep.measures}
    for cap in CAPABILITIES:
        sel = cap in SELECTION
        kinds = (["LL picks the marked item", "generation dominant (first clause)", "generation dominant (whole response)"]
                 if sel else ["LL directional (held-out pole words)", "LL directional, training-half pole words (diagnostic)",
                              "LL both poles right", "generation directional (first clause)",
                              "generation directional (whole response)"])
        kinds += ["conflict (LL), follows the channel over an opposing text",
                  "conflict (LL), follows the channel, opposing vs agreeing text",
                  "conflict (generation), follows the channel over an opposing text", "channel arm vs text arm (LL)"]
        for kind in kinds:
            m = named[f"{cap}: {kind}"]
            assert m.control is not None and m.test in REPORTED_TESTS, (m.name, m.test)
            assert m.n == 0 or (m.p_value is not None and 0 <= m.p_value <= 1)
            assert m.control != "channels zeroed" or sel  # no register row is compared with the zeroed arm
            # the same measure of the xattn arm, marked by its mode
            assert kind.startswith("channel arm vs text arm") or f"[xattn] {cap}: {kind}" in named
        # register: a sign test over prompt pairs, its pole-label permutation null beside it
        if not sel:
            d = named[f"{cap}: LL directional (held-out pole words)"]
            assert d.n + d.extra["ties"] == d.extra["n_units"] == cfg.n_heldout and 0 <= d.extra["p_permutation"] <= 1
            assert d.control_value == 0.5 and d.extra["unit"] == "prompt pair"
        # across the two adapter seeds: t tests over per-seed values
        across = [m for n, m in named.items() if n.startswith(f"{cap}: ") and n.endswith("across 2 adapter seeds")]
        assert len(across) == 4 and all(m.n == 2 and m.test in REPORTED_TESTS for m in across)
    for m in rep.measures:  # every reported test is one of those checked both ways in the tests
        assert m.p_value is None or m.test in REPORTED_TESTS, (m.name, m.test)
    # the published figures sit beside comparable measures only
    pub = {n: p for n, p in rep.published.items()}
    assert pub["all capabilities: conflict (generation), follows the channel over an opposing text"].value.startswith("264/265")
    assert not any("conflict (LL)" in n for n in pub)
    assert all("target loss" in n or "decides" in n for n in pub if n.startswith("native"))
    # the native track: per seed over items (evaluation noise), then across the training seeds (paired t)
    for b in ("baseline-width", "baseline-small", "baseline-large"):
        per = [m for m in rep.measures if m.name.startswith("native seed") and m.name.endswith(f"channels zeroed minus {b}")]
        across = named[f"native: held-out target loss, channels zeroed minus {b}, across {cfg.native_seeds} training seeds"]
        assert len(per) == cfg.native_seeds and across.n == cfg.native_seeds and across.test == "paired t-test"
        assert across.value == pytest.approx(np.mean([m.value for m in per]), rel=1e-4, abs=1e-5)
        assert (across.name in pub) == (b != "baseline-width")
    aim = named[f"native: held-out target loss, channels on minus baseline-width, across {cfg.native_seeds} training seeds"]
    assert aim.control == "baseline-width" and aim.n == cfg.native_seeds
    on = named[f"native: held-out target loss, channels on minus channels zeroed, across {cfg.native_seeds} training seeds"]
    assert on.n == cfg.native_seeds
    docs = [m for n, m in named.items() if n.startswith("native: held-out state-bearing document loss")]
    assert len(docs) == 3
    rate = named[f"native: channel decides the preferred continuation (selection rate), across {cfg.native_seeds} training seeds"]
    assert rate.control_value == pytest.approx(1 / 3) and rate.n == cfg.native_seeds
    assert {r["model"] for r in rep.tables["native models"]} == {"channels", "baseline-width", "baseline-small",
                                                                 "baseline-large"}
    assert {"alpha_heatmap", "alpha_trajectory", "attribution"} <= set(rep.figures)
    rep.save(tmp_path / "rep", formats=())                          # evaluate writes nothing; the caller saves
    write_lexicons(tmp_path / "rep")
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "lexicons.json").exists()
    arms = rep.tables["channel vs text vs neither (LL accuracy, prompt tokens per arm)"]
    assert all(r["tokens_text"] > 0 and r["tokens_channel"] == 0 for r in arms)
    # the text arm is sized like the channel arm, and also scored with its state worded as in training
    assert all(abs(r["text_params"] - r["channel_params"]) <= r["text_params"] / r["text_lora_rank"] / 2 for r in arms)
    assert all(0 <= r["text_trained_frames"] <= 1 and 0 <= r["p_channel_vs_text_trained_frames"] <= 1 for r in arms)
    # the channel's own control: register channels have one format in both splits, so it is the channel rate there
    assert all(r["channel_trained_frames"] == r["channel"] for r in arms if r["capability"] not in SELECTION)
    assert all(0 <= r["channel_trained_frames"] <= 1 and 0 <= r["p_channel_above_chance"] <= 1 for r in arms)
    assert any(n.startswith("Text arm: LoRA") for n in rep.notes)
    shares = rep.tables["captum attribution share (mean over items, 95% bootstrap CI)"]
    assert {r["capability"] for r in shares} == set(cfg.capabilities) and all(r["n"] >= 1 for r in shares)
    for r in shares:  # "mean [low, high]" per channel, the mean inside its interval
        for c in ("memory", "affect", "time", "ethics", "identity", "continuity"):
            v, lo, hi = map(float, re.findall(r"[-0-9.e]+", r[c])) if r["n"] > 1 else (float(r[c]),) * 3
            assert lo <= v <= hi


def test_evaluate_skips_a_text_arm_of_an_older_format(smoke_gpt2, smoke_artifacts):
    """A text arm trained before the LoRA (format 3: a bias adapter) is skipped with a note, not a crash."""
    import copy

    from lab.channels import evaluate, load
    cfg, arts = smoke_artifacts
    old = copy.copy(arts["text"])
    old.config = {**arts["text"].config, "format": 3}
    said = []
    rep = evaluate(load(arts["adapter"], smoke_gpt2), text_artifact=old, attribution=False, log=said.append)
    assert any("format 3" in n and "skipped" in n for n in rep.notes) and any("format 3" in s for s in said)
    assert not any("text arm" in m.name for m in rep.measures)


def test_mamba2_adapter_trains(smoke_mamba2, tmp_path):
    from lab.channels import train
    cfg = Config.preset("smoke", base="smoke-mamba2", steps=3, eval_every=3, batch_size=4)
    art = train(cfg, smoke_mamba2, out_dir=tmp_path / "m", force=True)
    assert art.tensors["alpha"].abs().max() > 0


def test_logprob_shift_and_attribution(smoke_gpt2, smoke_artifacts):
    from lab.channels import load
    from lab.channels.probes import channel_attribution, logprob_shift
    _, arts = smoke_artifacts
    m = load(arts["adapter"], smoke_gpt2)
    rows = logprob_shift(m, "Mara felt", {"affect": (1.0, 0.0)}, ["joyful", "gloomy"])
    assert len(rows) == 2 and all(abs(r["shift"] - (r["logp_channels"] - r["logp_zeroed"])) < 1e-5 for r in rows)
    zero = logprob_shift(m, "Mara felt", {}, ["joyful"])
    assert zero[0]["shift"] == 0.0                                  # no state -> no shift, exactly
    with pytest.raises(LabError):
        logprob_shift(m, "Mara felt", {}, [" "])
    attr = channel_attribution(m, heldout_items("affect", 1)[:1])
    assert abs(sum(v for k, v in attr[0].items() if k != "capability") - 1) < 1e-5
    # an item whose state sets only the affect channel: every other channel is zero at the input and at the
    # baseline, so its integrated gradient is exactly 0 and affect holds the whole share (why the report's
    # attribution items carry background states in the other channels)
    assert attr[0]["affect"] == pytest.approx(1.0) and all(attr[0][c] == 0 for c in m.injector.names if c != "affect")


def test_cli_train_and_evaluate(lab_home, smoke_gpt2):
    from typer.testing import CliRunner

    from lab.cli import app
    r = CliRunner().invoke(app, ["train", "channels", "--preset", "smoke", "--steps", "3", "--no-text-arm", "--force"])
    assert r.exit_code == 0, r.output
    assert "adapter:" in r.output
    # the native track, once per training seed (smoke: 2), each model's directory printed
    assert sum(line.startswith("native channels: ") for line in r.output.splitlines()) == 2, r.output
    # the same config options find what `lab train` trained (nothing is retrained)
    r = CliRunner().invoke(app, ["evaluate", "channels", "--preset", "smoke", "--steps", "3", "--no-text-arm",
                                 "--no-attribution", "--out", str(lab_home / "results" / "ch-cli")])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and (lab_home / "results" / "ch-cli" / "report.md").exists()
    report = (lab_home / "results" / "ch-cli" / "report.md").read_text()
    assert "native seed 1: held-out target loss" in report and "across 2 training seeds" in report  # it found both seeds


def test_app_page(lab_home, smoke_artifacts):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest
    page = Path(__file__).resolve().parents[1] / "app" / "pages" / "2_Proprioceptive_Channels.py"
    at = AppTest.from_file(str(page), default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    # both columns show the prompt and its continuation (as code or as highlighted markdown, whichever the page uses)
    shown = [c.value for c in at.code] + [m.value for m in at.markdown]
    assert sum("In the box there is a walnut" in v for v in shown) >= 2
    before = at.dataframe[0].value.copy()
    heat = at.get("plotly_chart")
    assert len(heat) >= 2
    at.slider(key="ch-valence").set_value(-1.0).run()
    assert not at.exception, at.exception
    after = at.dataframe[0].value
    assert not before["logp_channels"].equals(after["logp_channels"])  # the channel moved the log-probs
    assert before["logp_zeroed"].equals(after["logp_zeroed"])          # the zeroed column did not
    at.text_input(key="ch-items").set_value("onlyone").run()
    assert any("at least two" in e.value for e in at.error)


def test_xattn_variant_trains_and_depends_on_the_query(smoke_gpt2, tmp_path):
    from lab.channels import load, train
    cfg = Config.preset("smoke", mode="xattn", steps=3, eval_every=3, batch_size=4)
    art = train(cfg, smoke_gpt2, out_dir=tmp_path / "x", force=True)
    m = load(art.path, smoke_gpt2)
    assert m.injector.mode == "xattn" and m.injector.alpha.abs().max() > 0
    # unlike the additive form (a query-independent bias), the added vector differs across positions
    h = torch.randn(1, 5, smoke_gpt2.d_model)
    x = m.channels([ChannelState(affect=(1.0, 0.0), memory="the walnut")])
    d = m.injector.xattn_delta(0, h, m.injector.channel_tokens(x))
    assert d.shape == (1, 5, smoke_gpt2.d_model) and not torch.allclose(d[0, 0], d[0, 1])


def test_identity_init_reads_text_channels_in_the_base_space(smoke_gpt2):
    b = smoke_gpt2
    model = build(Config.preset("smoke"), b)
    inj = model.injector
    o = inj.names.index("memory")
    eff = inj.proj * inj.proj_scale  # stored divided by the lr ratio
    assert torch.allclose(eff[:, :b.d_model], torch.eye(b.d_model).expand(b.n_layers, -1, -1))  # memory first
    assert not torch.equal(inj.proj[:, b.d_model: b.d_model + 2], torch.zeros(b.n_layers, 2, b.d_model))
    rnd = build(Config.preset("smoke", text_init="random"), b)
    assert not torch.allclose(rnd.injector.proj[:, :b.d_model] * 0.1, torch.eye(b.d_model).expand(b.n_layers, -1, -1))
    with pytest.raises(LabError, match="text_init"):
        Config.preset("smoke", text_init="zeros")
    with pytest.raises(LabError, match="identity init"):
        ChannelInjector(8, 1, {"affect": 2}).init_weights(identity=("affect",))
    assert o == 0


def test_attribution_items_carry_all_six_live_channels():
    from lab.channels.evaluate import attribution_items
    its = attribution_items(Config.preset("smoke"))
    assert {i.capability for i in its} == set(CAPABILITIES)
    assert all(set(i.state) == {"memory", "affect", "time", "ethics", "identity", "continuity"} for i in its)
    # the item's own channel keeps its state (the label still refers to it)
    assert all(i.state[i.capability] == j.state[i.capability] for i, j in zip(
        its, [x for c in CAPABILITIES for x in [y for y in heldout_items(c, 3) if y.pole >= 0][:3]]))


@pytest.mark.parametrize("family", ["smoke-gpt2", "smoke-mamba2"])
@pytest.mark.parametrize("mode", ["additive", "xattn"])
def test_half_precision_base_trains_and_scores_with_float32_gates(family, mode, smoke_gpt2, smoke_mamba2, tmp_path):
    """A bfloat16 base (a large model in half precision): the injector keeps float32 parameters, the deltas
    reach the stream in its dtype (Mamba2 keeps its residual in float32 even then), closed gates are still
    bit-identical to the base, and training, scoring, generation and attribution run."""
    from lab.bases import load_base
    from lab.channels import load, train
    from lab.channels.probes import channel_attribution
    fixture = smoke_gpt2 if family == "smoke-gpt2" else smoke_mamba2
    b = load_base(fixture.path, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16
    model = build(Config.preset("smoke", base=family, mode=mode), b)
    assert model.injector.alpha.dtype == torch.float32
    ids, mask = b.encode(PROMPTS)
    ref = b.model(input_ids=ids, attention_mask=mask).logits
    x = model.channels([ChannelState(affect=(1.0, 0.0), memory="the walnut", time=(8, "Monday"))] * 2)
    with torch.no_grad(), inject(b, model.injector, x, batch=2):
        assert torch.equal(b.model(input_ids=ids, attention_mask=mask).logits, ref)  # alpha = 0
    cfg = Config.preset("smoke", base=family, mode=mode, steps=3, eval_every=3, batch_size=4)
    art = train(cfg, b, out_dir=tmp_path / "half", force=True)
    m = load(art.path, b)
    assert m.injector.alpha.dtype == torch.float32 and m.injector.alpha.abs().max() > 0
    with torch.no_grad(), inject(b, m.injector, x, batch=2):
        out = b.model(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == ref.dtype and torch.isfinite(out).all() and not torch.equal(out, ref)
    item = heldout_items("affect", 1)[0]
    lp = m.continuation_logprobs([item.prompt] * 2, [" glad", " sad"], m.channels([item.state] * 2))
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    assert len(m.generate([item.prompt], m.channels([item.state]), max_new_tokens=2)) == 1
    if mode == "additive":
        rows = channel_attribution(m, [item], n_steps=4)
        assert abs(sum(v for k, v in rows[0].items() if k != "capability") - 1) < 1e-4
    # a value that is finite in float32 but not in the base's dtype is still refused (bf16 has float32's range,
    # so the check is the float16 one)
    with pytest.raises(LabError, match="magnitude"):
        concat_channel_values({"affect": torch.tensor([[1e5, 0.0]])}, m.injector.widths, dtype=torch.float32,
                              check_dtype=torch.float16)


def test_tiny_preset_learning_rates_are_per_base_and_overridable():
    gpt2, mamba = Config.preset("tiny"), Config.preset("tiny", base="tiny-mamba2")
    assert (gpt2.lr, gpt2.text_lr) == (0.12, 3e-3)
    tuned = Config.PER_BASE[("tiny", "tiny-mamba2")]
    assert (mamba.lr, mamba.text_lr) == (6e-2, 1e-4) == (tuned["lr"], tuned["text_lr"])
    assert Config.preset("tiny", base="tiny-mamba2", lr=0.5, text_lr=2e-3).lr == 0.5  # an explicit choice wins
    assert Config.preset("smoke", base="tiny-mamba2").lr == Config.preset("smoke").lr  # tuned for the tiny preset only
    assert Config.preset("tiny", base="tiny-mamba2").to_dict()["lr"] == 6e-2  # so it keys the artifact


def test_native_seeds_are_validated_and_do_not_retrain_the_adapter_arms():
    assert Config.preset("tiny").native_seeds == 3 and Config.preset("smoke").native_seeds == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LabError, match=f"native_seeds must be (a positive int|an integer), got {bad!r}"):
            Config.preset("smoke", native_seeds=bad)
    # the native track's knobs decide none of the arms' artifacts: more native seeds must not retrain an adapter
    a, b = Config.preset("tiny"), Config.preset("tiny", native_seeds=5, native_steps=2400)
    for arm in ("channel", "text"):
        assert a.training_dict(arm) == b.training_dict(arm)
        assert Config.training_view(b.to_dict(), arm) == a.training_dict(arm)
    # nor does what a base joining another's report switches off (tiny-mamba2 in the tiny report: its text arm and
    # native track)
    m = Config.preset("tiny", base="tiny-mamba2")
    joined = Config.preset("tiny").on_base("tiny-mamba2")
    assert Config.preset("tiny").extra_bases == ("tiny-mamba2",) and m.extra_bases == ()
    assert (joined.train_text_arm, joined.native, joined.lr, joined.text_lr) == (False, False, m.lr, m.text_lr)
    assert joined.training_dict("channel") == m.training_dict("channel")
    assert "extra_bases" not in m.to_dict() and m.to_dict()["format"] == Config.FORMAT
    assert Config.preset("tiny", steps=5).training_dict("channel") != a.training_dict("channel")  # its own knobs do
    # one directory per seed and model, two levels under the models directory (where the dashboard lists artifacts)
    from lab.channels.train import native_run_dirs
    runs = native_run_dirs(Config.preset("tiny", seed=4), root="/m")
    assert [run["channels"].as_posix() for run in runs] == [f"/m/channels-native-tiny-seed{s}/channels" for s in (4, 5, 6)]


def test_run_is_the_whole_pipeline_and_joins_extra_bases(smoke_gpt2, smoke_mamba2):
    """`run` trains what is missing and evaluates; a base in `extra_bases` that is on disk joins the report with
    its adapter track (its own per-base config, no text arm, no native track), every name marked by its base."""
    from lab.channels import run
    cfg = Config.preset("smoke", steps=3, eval_every=3, batch_size=4, n_heldout=4, gen_tokens=2, native=False,
                        train_text_arm=False, extra_bases=("smoke-mamba2",))
    rep = run(cfg, smoke_gpt2, progress=False, attribution=False)
    mine = [m.name for m in rep.measures if not m.name.startswith("[")]
    joined = [m.name for m in rep.measures if m.name.startswith("[smoke-mamba2] ")]
    assert mine and [n.split("] ", 1)[1] for n in joined] == mine
    assert not any("text arm" in n or n.startswith("native") for n in mine)  # the config trains neither control
    assert {"alpha_heatmap", "alpha_heatmap_smoke_mamba2"} <= set(rep.figures)
    assert "[smoke-mamba2] alpha (final, layer x channel)" in rep.tables and "[smoke-mamba2] lexicons" not in rep.tables
    assert "channels-smoke-smoke-mamba2" in rep.provenance["smoke-mamba2 artifact"]


# --- tests that can fail, responses, validation split, the native track's document states ----------------------

def test_each_reported_test_can_come_out_either_way():
    """Every test the report uses (`REPORTED_TESTS`) on synthetic inputs: significant where the effect is there, not
    where it is not. The register generation and conflict scorers go from synthetic texts to the test, so a zeroed
    arm's identical responses (all ties) cannot pass as evidence."""
    from lab.channels.evaluate import (
        REPORTED_TESTS,
        follow_vs_agree,
        gen_signs,
        gen_success,
        sign_test,
        vs_chance,
    )
    from lab.stats import compare_proportions, paired_delta, paired_t, t_mean

    rng = np.random.default_rng(0)
    cases = {
        "exact sign test (two-sided binomial, ties left out)": (
            lambda: sign_test("s", [1.0] * 18 + [-1.0] * 2, "pair"), lambda: sign_test("s", [1.0] * 10 + [-1.0] * 10, "pair")),
        "exact McNemar": (lambda: compare_proportions("m", [True] * 20, [False] * 20, "c"),
                          lambda: compare_proportions("m", [True, False] * 10, [False, True] * 10 + [], "c")),
        "exact binomial (two-sided)": (lambda: vs_chance("b", [True] * 15 + [False] * 5, 1 / 3, "item"),
                                       lambda: vs_chance("b", [True] * 7 + [False] * 14, 1 / 3, "item")),
        "paired t-test": (lambda: paired_t("p", [1.1, 2.2, 3.1, 4.0], [0.1, 1.0, 2.2, 3.1], "c"),
                          lambda: paired_t("p", [1.0, 2.3, 2.9, 4.0], [1.1, 2.0, 3.1, 4.1], "c")),
        "one-sample t-test": (lambda: t_mean("t", [0.9, 0.95, 0.92], 0.5, "c"), lambda: t_mean("t", [0.4, 0.6, 0.52], 0.5, "c")),
        "paired sign-flip permutation (mean)": (lambda: paired_delta("d", rng.normal(1, 0.1, 20), np.zeros(20), "c"),
                                                lambda: paired_delta("d", rng.normal(0, 1, 20), np.zeros(20), "c")),
        "sign-flip permutation (no spread for a t-test)": (lambda: t_mean("t", [0.9] * 8, 0.5, "c"),
                                                           lambda: t_mean("t", [0.5] * 8, 0.5, "c")),
    }
    assert set(cases) == set(REPORTED_TESTS)
    for name, (yes, no) in cases.items():
        hit, miss = yes(), no()
        assert hit.test == miss.test == name
        assert hit.p_value < 0.05 < miss.p_value, (name, hit.p_value, miss.p_value)
    # the sign test goes either way: as significant against the channel as for it, and no evidence (p = 1) when all tie
    against = sign_test("s", [-1.0] * 18 + [1.0] * 2, "pair")
    assert against.p_value < 0.05 and against.value == pytest.approx(0.1)
    tied = sign_test("s", [0.0] * 12, "pair")
    assert np.isnan(tied.value) and tied.p_value == 1.0 and tied.extra["channel_way"] == tied.extra["other_way"] == 0
    assert tied.n == tied.extra["ties"] == 12 and tied.extra["p_permutation"] == 1.0 and "ties" in tied.extra["why"]
    # the pole-label permutation null beside it: small for a consistent shift, large for a balanced one
    assert sign_test("s", [0.5] * 12, "pair").extra["p_permutation"] < 0.01
    assert sign_test("s", [0.5, -0.5] * 6, "pair").extra["p_permutation"] > 0.5
    # from texts: register pairs whose +pole responses are more positive are directional; identical responses (what
    # the zeroed arm gives) are all ties, never evidence
    items = heldout_items("affect", 12)
    good = ["joyful, happy and glad." if it.pole > 0 else "miserable and awful." for it in items]
    same = ["she sat down." for _ in items]
    assert sign_test("g", gen_success("affect", items, good)[0], "pair").p_value < 0.01
    tied = sign_test("g", gen_success("affect", items, same)[0], "pair")
    assert tied.extra["channel_way"] == tied.extra["other_way"] == 0 and tied.p_value == 1.0
    # conflict from texts: following the channel, following the text, and against the agreeing arm
    sel = heldout_items("memory", 20)
    follow = [f"the {it.keys[it.label][0]}." for it in sel]
    text_wins = [f"the {it.keys[it.conflict_label][0]}." for it in sel]
    assert sign_test("c", gen_signs("memory", sel, follow), "item", permutation=False).p_value < 0.01
    assert sign_test("c", gen_signs("memory", sel, text_wins), "item", permutation=False).value == 0
    assert follow_vs_agree("a", gen_signs("memory", sel, text_wins), gen_signs("memory", sel, follow), "item").p_value < 0.01
    assert follow_vs_agree("a", gen_signs("memory", sel, follow), gen_signs("memory", sel, follow), "item").p_value == 1.0


def test_corpus_documents_carry_their_state_with_byte_identical_text():
    import hashlib

    from lab.corpus import documents, documents_with_state
    train, held = documents_with_state("train", 300, 1234), documents_with_state("heldout", 100, 4321)
    assert [t for t, _ in train] == documents("train", 300, 1234) and [t for t, _ in held] == documents("heldout", 100, 4321)
    # the text of every document as the corpus generated it before it returned states (the bases and caches need it)
    digest = hashlib.sha256("\x00".join([t for t, _ in train] + [t for t, _ in held]).encode()).hexdigest()
    assert digest == "a2aeddcb93e8d8e008c7009e9bb4d53b31aafffea40d21de99baa77dca917ebd"
    stated = [(t, s) for t, s in train if s]
    assert 0.4 < len(stated) / len(train) < 0.7                       # narrative (0.32) and dialog (0.22) documents
    for text, state in stated:                                        # the state is the one the text was written from
        assert (state["weekday"] is None) == (state["kind"] == "dialog")
        if state["kind"] == "narrative":                              # its first sentence names all three
            assert text.startswith(f"On {state['weekday']} at {state['time_of_day']}, {state['name']} the {state['role']}")
        else:                                                         # the user's question names the topic
            assert state["topic"] in text.split("\n")[0]


def test_document_states_become_channels_and_bad_states_are_clear_errors(smoke_gpt2):
    from lab.channels.data import document_channels
    from lab.corpus import documents_with_state
    docs = documents_with_state("train", 200, 1234)
    chans = [document_channels(s) for _, s in docs]
    assert all(c == {} for c, (_, s) in zip(chans, docs) if s is None)
    x = encode_states(chans, TextEncoder(smoke_gpt2))
    stated = torch.tensor([s is not None for _, s in docs])
    assert (x["affect"][stated, 0].abs() == 0.8).all() and (x["affect"][~stated] == 0).all()
    good = next(s for _, s in docs if s)
    for change, msg in [({"mood": "sideways"}, "mood 'sideways'"), ({"time_of_day": "teatime"}, "time of day 'teatime'"),
                        ({"posture": "reckless"}, "posture 'reckless'"), ({"weekday": "Funday"}, "weekday 'Funday'"),
                        ({"name": ""}, "name ''")]:
        with pytest.raises(LabError, match=msg):
            document_channels({**good, **change})
    with pytest.raises(LabError, match="lacks"):
        document_channels({k: v for k, v in good.items() if k != "topic"})
    with pytest.raises(LabError, match="must be a dict"):
        document_channels("happy")
    # a dialog names no weekday: its time channel carries the hour, the weekday features are zero
    assert encode_time(9.0, None)[4:7].tolist() == [0.0, 0.0, 0.0]


def test_response_templates_use_the_marked_item_and_missing_it_is_a_clear_error(smoke_gpt2):
    from lab.channels.data import RESPONSES, check_response_templates, response_text
    from lab.channels.model import target_of
    with pytest.raises(LabError, match="must start with the marked item"):
        check_response_templates(["The {x} is here."])
    with pytest.raises(LabError, match=r"'\{x\}. I like it.' is missing the marked item"):
        check_response_templates(["{x}. I like it."])
    with pytest.raises(LabError, match="missing the marked item"):
        response_text("{x}. Nothing more.", x="walnut")
    with pytest.raises(LabError, match="non-empty list"):
        check_response_templates("{x}. The {x}.")
    assert set(RESPONSES) == set(CAPABILITIES)
    for cap in CAPABILITIES:
        assert not set(RESPONSES[cap]["train"]) & set(RESPONSES[cap]["heldout"])
        for it in sample_items(cap, "train", 20, seed=3) + heldout_items(cap, 6):
            # the response's first clause is the one-word target; then it uses the marked item (or pole word) again
            assert it.response.startswith(it.target) and len(it.response) > len(it.target) + 5
            assert it.response[len(it.target):].count(it.target.strip(" .")) >= 1
    it = train_batch_items(0, 1, seed=0)[0]
    assert target_of(it, Config.preset("smoke")) == it.response
    assert target_of(it, Config.preset("smoke", targets="word")) == it.target
    model, word = build(Config.preset("smoke"), smoke_gpt2), build(Config.preset("smoke", targets="word"), smoke_gpt2)
    batch = train_batch_items(0, 4, seed=0)
    with torch.no_grad():
        assert float(model.loss(batch)) != float(word.loss(batch))
    with pytest.raises(LabError, match="targets"):
        Config.preset("smoke", targets="sentence")


def test_validation_comes_from_training_templates_and_entities_not_the_test_pools():
    from lab.channels.data import validation_items
    val = validation_items(CAPABILITIES, 4, seed=0)
    assert {i.capability for i in val} == set(CAPABILITIES) and all(i.split == "train" for i in val)
    ho_only = entity_words("heldout")
    for it in val:
        assert it.template.split("/")[1] == "train"
        assert not set(re.findall(r"[a-z']+", (it.prompt + it.response + repr(it.state)).lower())) & ho_only
    # its own draws: not the first training batch's items
    assert {i.prompt for i in val} != {i.prompt for i in train_batch_items(0, len(val), seed=0)}


def test_training_word_diagnostic_swaps_only_the_candidates():
    from lab.channels.data import pool, with_training_words
    items = heldout_items("affect", 5)
    swapped = with_training_words(items)
    train_words = {f" {w}." for w in pool("positive", "train") + pool("negative", "train")}
    for a, b in zip(items, swapped):
        assert (a.prompt, a.state, a.label, a.pair) == (b.prompt, b.state, b.label, b.pair)
        assert set(b.candidates) <= train_words and not set(a.candidates) & train_words
    # both poles of a pair get the same two words
    by_pair = {}
    for b in swapped:
        by_pair.setdefault(b.pair, set()).add(tuple(b.candidates))
    assert all(len(v) == 1 for v in by_pair.values())
    with pytest.raises(LabError, match="register items"):
        with_training_words(heldout_items("memory", 1))


def test_native_documents_train_with_their_state_in_the_channels(smoke_gpt2):
    """During native pretraining a document's generator state is in the channels (zero for documents without one),
    so the corpus loss depends on it once a gate is open; a state that does not parse stops the batch."""
    from lab.channels.train import NativeModel, _gpt2, document_batch
    from lab.corpus import documents_with_state, load_tokenizer
    tok = load_tokenizer()
    cfg = Config.preset("smoke")
    docs = documents_with_state("train", 12, 1234)
    model = NativeModel(_gpt2(len(tok), tok, cfg.native_d, cfg.native_layers, cfg.native_heads, cfg.native_seq, 0),
                        tok, cfg, TextEncoder(smoke_gpt2), True)
    ids, att, states = document_batch(tok, docs, cfg.native_seq)
    assert ids.shape[0] == 12 and ids.shape[1] <= cfg.native_seq + 1 and [bool(s) for s in states] == [bool(s) for _, s in docs]
    with torch.no_grad():
        closed = model.doc_losses(ids, att, states)
        model.cm.injector.alpha.fill_(0.5)
        on, zeroed = model.doc_losses(ids, att, states), model.doc_losses(ids, att, states, zero=True)
    stated = torch.tensor([s is not None for _, s in docs])
    assert torch.equal(closed, zeroed)                                   # zeroed = the channel-less forward
    assert (on[stated] != zeroed[stated]).all() and torch.equal(on[~stated], zeroed[~stated])
    bad = [(docs[0][0], {**next(s for _, s in docs if s), "mood": "sideways"})]
    with pytest.raises(LabError, match="mood 'sideways'"):
        document_batch(tok, bad, cfg.native_seq)
