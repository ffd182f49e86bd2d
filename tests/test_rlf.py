"""Recursive Latent Forcing: data, model, training, evaluation, probes, app, CLI and bad input (smoke bases)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import LabError

# --- data ------------------------------------------------------------------------------------------

def test_problems_need_dereferencing():
    from lab.corpus import VALUE_WORDS
    from lab.rlf.data import make_problem, parse_prompt
    rng = random.Random(0)
    in_order = 0
    for _ in range(300):
        h = rng.randint(1, 12)
        p = make_problem(rng, h)
        assert p.prompt.endswith("\nAnswer:") and p.hops == h == len(p.path)
        assert p.n_distractors >= 1 and p.value in VALUE_WORDS
        parsed = parse_prompt(p.prompt)
        assert parsed["path"] == list(p.path) and parsed["query"] == p.query
        # distractors: a twin chain as long as the queried one, ending in another value
        ends = {}
        for name in parsed["assignments"]:
            cur, depth = name, 0
            while cur in parsed["assignments"]:
                cur, depth = parsed["assignments"][cur], depth + 1
            ends.setdefault(depth, set()).add(cur)
        assert max(ends) >= h and len(ends[h]) >= 2 and p.value in ends[h]
        assert sum(v in VALUE_WORDS for v in parsed["assignments"].values()) == 1 + p.n_distractors
        # order: the chain's assignments are not always written in dereference order
        sents = p.prompt.split(" What is")[0].split(". ")
        chain_pos = [next(i for i, s in enumerate(sents) if s.startswith(f"{lhs} ="))
                     for lhs in [p.query, *p.path[:-1]]]
        in_order += chain_pos == sorted(chain_pos)
    assert in_order < 150  # shuffled: far from always in order (1-hop problems are trivially "in order")


def test_the_query_blind_longest_chain_rule_is_near_chance():
    """The task version-1 flaw, as a regression test: with 1-2-hop distractors the value at the end of
    the longest chain answered every 3+-hop problem without reading the query."""
    from lab.corpus import pointer_chain
    from lab.rlf.data import format_prompt, longest_chain_answer, make_problem
    rng = random.Random(3)
    for h in (3, 6, 12):
        old = [pointer_chain(rng, h, rng.randint(1, 3)) for _ in range(100)]
        assert all(longest_chain_answer(format_prompt(s, q)) == path[-1] for s, q, path in old)
        new = [make_problem(rng, h) for _ in range(300)]
        acc = sum(longest_chain_answer(p.prompt, rng) == p.value for p in new) / len(new)
        assert 0.3 < acc < 0.65, (h, acc)  # about 1/2: the twin ties the queried chain


def test_targets_are_path_then_halt(smoke_gpt2):
    from lab.corpus import HALT, single_token_id
    from lab.rlf.data import Vocab, make_problem
    v = Vocab(smoke_gpt2.tokenizer)
    rng = random.Random(1)
    probs = [make_problem(rng, h) for h in (1, 3, 5)]
    t = v.targets(probs, 6)
    assert t.shape == (3, 6)
    for i, p in enumerate(probs):
        want = [single_token_id(smoke_gpt2.tokenizer, w) for w in p.path] + [v.halt_id] * (6 - p.hops)
        assert t[i].tolist() == want
    assert smoke_gpt2.tokenizer.convert_ids_to_tokens(v.halt_id) == HALT


def test_heldout_sets_saved_deterministic_and_disjoint_from_training(lab_home):
    from lab.rlf.data import TEST_HOPS, excluded_prompts, generate_heldout_set, heldout_path, heldout_set, train_batch
    sets = {h: heldout_set(h, 500) for h in TEST_HOPS}
    for h, s in sets.items():
        assert len(s) == 500 and len({p.prompt for p in s}) == 500 and all(p.hops == h for p in s)
        assert heldout_path(h, 500, 0).exists()
    assert [p.prompt for p in heldout_set(7, 500)] == [p.prompt for p in generate_heldout_set(7, 500)]
    ex = excluded_prompts()
    assert all(p.prompt in ex for s in sets.values() for p in s)
    a = train_batch(3, 64, seed=0, exclude=ex)
    assert [p.prompt for p in a] == [p.prompt for p in train_batch(3, 64, seed=0, exclude=ex)]
    assert not {p.prompt for p in a} & ex
    assert {p.hops for p in train_batch(0, 256, seed=0)} == {1, 2, 3, 4, 5}
    assert {p.hops for p in train_batch(0, 64, seed=0, curriculum_steps=500)} == {1}
    # one hop count per batch: every problem of a batch has the same hops, all hop counts still drawn
    one = [train_batch(s, 16, seed=0, one_hop_count=True) for s in range(60)]
    assert all(len({p.hops for p in b}) == 1 for b in one)
    assert {b[0].hops for b in one} == {1, 2, 3, 4, 5}
    assert [p.prompt for p in one[7]] == [p.prompt for p in train_batch(7, 16, seed=0, one_hop_count=True)]
    # other test seeds are held out by the size of the problem space (lab.rlf.data's doc): even 1-hop
    # problems, the smallest space, do not repeat in 20,000 draws
    from lab.rlf.data import make_problem
    rng = random.Random("space")
    assert len({make_problem(rng, 1).prompt for _ in range(20_000)}) == 20_000


# --- model -----------------------------------------------------------------------------------------

def test_loop_rope_is_identity_at_zero_and_a_rotation():
    from lab.rlf.model import loop_rope
    x = torch.randn(2, 5, 16)
    assert torch.equal(loop_rope(x, 0), x)
    y = loop_rope(x, 3)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(loop_rope(loop_rope(x, 1), 2), loop_rope(x, 3), atol=1e-5)  # angles add
    assert not torch.allclose(y, x)


def test_core_short_convolutions_are_causal_depthwise_and_separate_for_q_and_k():
    """The fused channels-last conv2d must compute what two causal depthwise Conv1d's would: position t
    sees positions t-width+1..t of its own channel only, q with q_conv's taps and k with k_conv's."""
    from lab.rlf.model import CoreBlock
    torch.manual_seed(0)
    block = CoreBlock(d=8, n_heads=2, ff_mult=2, token_rope=True, conv=3)
    with torch.no_grad():
        block.q_conv.weight.normal_()
        block.k_conv.weight.normal_()
    qk = torch.randn(2, 7, 16, requires_grad=True)
    out = block._short_conv_qk(qk)
    assert out.shape == qk.shape
    ref = []
    for conv, part in ((block.q_conv, qk[..., :8]), (block.k_conv, qk[..., 8:])):
        x = torch.nn.functional.pad(part.transpose(1, 2), (2, 0))          # left pad: causal
        ref.append(torch.nn.functional.conv1d(x, conv.weight, groups=8).transpose(1, 2))
    assert torch.allclose(out, torch.cat(ref, -1), atol=1e-6)
    # causal: the output at position 3 has no gradient from positions 4..6
    out[:, 3].sum().backward()
    assert qk.grad[:, 4:].abs().max() == 0 and qk.grad[:, 1:4].abs().max() > 0 and qk.grad[:, 0].abs().max() == 0


@pytest.mark.parametrize("core", ["transformer", "mamba2"])
def test_zero_init_loop0_reads_the_base_and_hooks_record_every_loop(any_base, core):
    from lab.hooks import ActivationCache
    from lab.rlf import Config
    from lab.rlf.model import LOOP_SITES, build, encode_prompts
    # the Mamba2 core on the Mamba2 base takes the options bench_rlf's Mamba2 configurations use (conv 6, the
    # lookup prior): the prior leaves the zero output projection alone, so loop 0 still reads the base
    mamba_opts = dict(mamba_conv=6, mamba_init="match") if core == "mamba2" and any_base.arch != "gpt2" else {}
    cfg = Config.preset("smoke", core=core, d_core=32, n_heads=4, mamba_head_dim=16, answer_space="full",
                        **mamba_opts)
    m = build(cfg, any_base)
    prompts = ["K = walnut. R = K. What is R?\nAnswer:", "B = C. C = maple. D = amber. What is B?\nAnswer:"]
    ids, mask = encode_prompts(any_base, prompts)
    cache = ActivationCache()
    with torch.no_grad():
        logits = m.run(ids, mask, 3, cache=cache)
        ref = any_base.model(input_ids=ids, attention_mask=mask).logits
    ans = mask.sum(1) - 1
    base_logits = ref[torch.arange(2), ans]
    # core output is zero at init; lifeline doubles the state; the final norm is scale-invariant
    assert torch.allclose(logits[0], base_logits, atol=1e-3, rtol=1e-3)
    # the task answer space masks every logit but names, values and HALT
    masked = build(cfg.with_(answer_space="task"), any_base)
    with torch.no_grad():
        lt = masked.run(ids, mask, 1)[0]
    task = torch.cat([m.vocab.name_ids, m.vocab.value_ids, torch.tensor([m.vocab.halt_id])])
    keep = torch.zeros(lt.shape[-1], dtype=torch.bool)
    keep[task] = True
    assert torch.allclose(lt[:, keep], base_logits[:, keep], atol=1e-3, rtol=1e-3) and (lt[:, ~keep] < -1e8).all()
    for k in range(3):
        for s in LOOP_SITES:
            assert cache[f"loop.{k}.{s}"].shape == (2, any_base.d_model)
    assert torch.count_nonzero(cache["loop.0.core_out"]) == 0
    assert cache.stack("latent", prefix="loop").shape == (3, 2, any_base.d_model)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "gate" in trainable and not any(n.startswith("base") for n in trainable)
    assert all(not p.requires_grad for p in any_base.model.parameters())


def test_baseline_switches(smoke_gpt2):
    from lab.rlf import Config
    from lab.rlf.data import make_problem
    from lab.rlf.model import build
    from lab.rlf.train import supervision
    m = build(Config.preset("smoke", lifeline=False), smoke_gpt2)
    assert "gate" not in {n for n, p in m.named_parameters()} and torch.count_nonzero(m.gate) == 0
    cfg = Config.preset("smoke", supervision="answer_only")
    m = build(cfg, smoke_gpt2)
    rng = random.Random(0)
    probs = [make_problem(rng, 1), make_problem(rng, 3)]
    t, w = supervision(m, probs, cfg)
    assert w.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert Config.preset("smoke", loop_rope=False).variant == "norope"


def test_loop_norm_ends_every_loop_and_decay_spares_gate_biases_norms(smoke_gpt2):
    """The published loop ends each iteration with an RMSNorm: the state a loop hands on has RMS 1 (weight ones at
    init), whatever the lifeline adds; without it the state grows with every lifeline add."""
    from lab.hooks import ActivationCache
    from lab.rlf import Config
    from lab.rlf.model import build, encode_prompts
    ids, mask = encode_prompts(smoke_gpt2, ["K = walnut. R = K. What is R?\nAnswer:"])
    grow = {}
    for norm in (True, False):
        m = build(Config.preset("smoke", loop_norm=norm), smoke_gpt2)
        cache = ActivationCache()
        with torch.no_grad():
            m.run(ids, mask, 4, cache=cache)
        rms = cache.stack("latent", prefix="loop").pow(2).mean(-1).sqrt()[:, 0]     # (loops,)
        grow[norm] = rms
        assert (m.loop_norm is not None) == norm
    assert torch.allclose(grow[True], torch.ones(4), atol=1e-3)
    assert (grow[False][1:] > grow[False][:-1]).all()   # each loop adds the prompt again: the raw state grows
    m = build(Config.preset("smoke"), smoke_gpt2)
    spared = {n for n, p in m.named_parameters() if p.requires_grad and m.no_decay(n)}
    assert "gate" in spared and "loop_norm.weight" in spared and "core.in_proj.bias" in spared
    assert "core.in_proj.weight" not in spared and "core.out_proj.weight" not in spared
    assert not any(build(Config.preset("smoke", decay="all"), smoke_gpt2).no_decay(n) for n in spared)


def test_trainer_parameter_groups_spare_what_no_decay_names():
    """fit(no_decay=...): the named tensors sit in a zero-decay group; without it every tensor decays, as before."""
    from lab.trainer import TrainSpec, fit

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Parameter(torch.ones(4))
            self.w = torch.nn.Parameter(torch.ones(4, 4))

    spec = TrainSpec(steps=5, lr=0.1, warmup=0, weight_decay=0.5, grad_clip=None, eval_every=0, ckpt_every=0)
    for no_decay, gate_kept in ((None, False), (lambda n: n == "gate", True)):
        m = Two()
        fit(m, lambda step, rank, world: {}, lambda mod, b: 0.0 * (mod.gate.sum() + mod.w.sum()), spec, desc="t",
            no_decay=no_decay)
        assert torch.equal(m.gate.detach(), torch.ones(4)) == gate_kept
        assert (m.w.detach() < 1).all()   # the matrix decays either way (a zero loss: decay alone moves it)


def test_paper_loop_reruns_upper_blocks_with_lora_and_leaves_the_base_alone(smoke_mamba2, tmp_path):
    from lab.rlf import Config
    from lab.rlf.model import PAPER_SITES, build, encode_prompts
    from lab.rlf.train import load, train
    before = {n: p.detach().clone() for n, p in smoke_mamba2.model.named_parameters()}
    cfg = Config.preset("smoke", base="smoke-mamba2", core="mamba2", loop="paper", base_blocks=-1, d_core=32,
                        mamba_head_dim=16, lora_rank=4, steps=2, eval_every=2, ckpt_every=2, val_n_per_hop=2)
    assert cfg.run_name().endswith("-mamba2-paperloop")
    m = build(cfg, smoke_mamba2)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "head" in trainable and "gate" in trainable and "loop_norm.weight" in trainable
    assert any("upper.0.mixer.in_proj.lora_A" in n for n in trainable)
    assert any("upper.0.mixer.out_proj.lora_B" in n for n in trainable)
    assert not any(n.startswith("upper") and "lora_" not in n for n in trainable)   # the re-run blocks stay frozen
    assert len(m.upper) == smoke_mamba2.n_layers - 1
    ids, mask = encode_prompts(smoke_mamba2, ["K = walnut. R = K. What is R?\nAnswer:"])
    from lab.hooks import ActivationCache
    cache = ActivationCache()
    m.run(ids, mask, 2, cache=cache)[-1].sum().backward()
    assert f"loop.1.{PAPER_SITES[0]}" in cache
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)
    art = train(cfg, smoke_mamba2, tmp_path / "paper")
    again = load(art.path, smoke_mamba2)
    assert torch.equal(again.head, art.tensors["head"])
    for n, p in smoke_mamba2.model.named_parameters():   # a copy of the blocks trained, never the shared base
        assert torch.equal(p, before[n]), n
    assert not any("lora" in n for n, _ in smoke_mamba2.model.named_modules())


def test_mamba2_core_conv_width_and_lookup_prior(smoke_gpt2):
    from lab.rlf import Config
    from lab.rlf.model import build
    mamba = dict(core="mamba2", d_core=32, mamba_head_dim=16)
    published = build(Config.preset("smoke", **mamba), smoke_gpt2).core.block.mixer
    prior = build(Config.preset("smoke", **mamba, mamba_conv=6, mamba_init="match"), smoke_gpt2).core.block.mixer
    assert published.conv1d.kernel_size == (4,) and prior.conv1d.kernel_size == (6,)
    inner, n = prior.intermediate_size, prior.ssm_state_size
    rows = lambda mx, k: mx.in_proj.weight[2 * inner + k * n: 2 * inner + (k + 1) * n]   # noqa: E731  k: 0 B, 1 C
    assert torch.equal(rows(prior, 0), rows(prior, 1)) and not torch.equal(rows(published, 0), rows(published, 1))
    taps = prior.conv1d.weight[:, 0]                                   # (x | B | C channels, width)
    assert torch.equal(taps[:inner], torch.eye(6)[-1].expand(inner, 6))   # x: the position's own token
    assert torch.allclose(taps[inner:], torch.full((2 * n, 6), 1 / 6))  # B and C: the mean of the last 6
    # so after the convolution every position reads (C) with exactly the key it writes under (B): a read at
    # position t weighs position s by how alike their last 6 inputs are
    x = torch.randn(1, 9, 32)
    zxbcdt = prior.in_proj(x)
    xbc = prior.conv1d(zxbcdt[..., inner: inner + inner + 2 * n].transpose(1, 2))[..., :9].transpose(1, 2)
    assert torch.allclose(xbc[..., inner: inner + n], xbc[..., inner + n:])
    with pytest.raises(LabError, match=r"mamba_init must be one of \('published', 'match'\), got 'tied'"):
        Config.preset("smoke", **mamba, mamba_init="tied")
    with pytest.raises(LabError, match="mamba_conv"):
        Config.preset("smoke", **mamba, mamba_conv=0)


def test_paper_loop_bad_input(smoke_gpt2, smoke_mamba2):
    from types import SimpleNamespace

    from lab.rlf import Config
    from lab.rlf.model import build, paper_split
    paper = dict(base="smoke-mamba2", core="mamba2", loop="paper", base_blocks=-1, d_core=32, mamba_head_dim=16)
    with pytest.raises(LabError, match=r"loop must be one of \('standard', 'paper'\), got 'papr'"):
        Config.preset("smoke", loop="papr")
    with pytest.raises(LabError, match="lora_rank 65 does not fit.*at most 64"):
        build(Config.preset("smoke", **paper, lora_rank=65), smoke_mamba2)
    with pytest.raises(LabError, match="lora_rank"):
        Config.preset("smoke", **paper, lora_rank=0)
    with pytest.raises(LabError, match="has 2 blocks; loop_blocks=2"):
        build(Config.preset("smoke", **paper, loop_blocks=2), smoke_mamba2)
    with pytest.raises(LabError, match="at least 2 blocks.*'one-block' has 1 block;"):
        paper_split(SimpleNamespace(n_layers=1, name="one-block"))
    assert paper_split(SimpleNamespace(n_layers=24, name="mamba2-130m")) == (6, 18)   # the published layers 6-23
    with pytest.raises(LabError, match="'smoke-gpt2' is a gpt2 base"):
        build(Config.preset("smoke", loop="paper", base_blocks=-1), smoke_gpt2)
    with pytest.raises(LabError, match="base_blocks=-1.*got base_blocks=0"):
        Config.preset("smoke", **{**paper, "base_blocks": 0})
    with pytest.raises(LabError, match="decay"):
        Config.preset("smoke", decay="some")


def test_length_controlled_sets_hold_their_lengths(smoke_gpt2):
    from lab.rlf.data import length_controlled_set, prompt_lengths, training_length_range
    tok = smoke_gpt2.tokenizer
    lo, hi = training_length_range(tok, 2, n=256)
    assert 0 < lo < hi
    short = length_controlled_set(4, 20, tok, max_len=hi, distractors=(1, 1))
    padded = length_controlled_set(1, 20, tok, min_len=hi + 1, distractors=(3, 24))
    assert short and all(p.hops == 4 for p in short) and max(prompt_lengths(tok, short)) <= hi
    assert padded and all(p.hops == 1 for p in padded) and min(prompt_lengths(tok, padded)) > hi
    assert len({p.prompt for p in padded}) == len(padded)
    with pytest.raises(LabError, match="length range"):
        length_controlled_set(2, 5, tok, min_len=10, max_len=5)
    with pytest.raises(LabError, match="distractors"):
        length_controlled_set(2, 5, tok, distractors=(0, 2))


def test_ram_overlap_across_seeds_against_chance(smoke_gpt2):
    from lab.rlf import Config
    from lab.rlf.model import build
    from lab.rlf.probes import ram_overlap
    ms = [build(Config.preset("smoke", seed=s), smoke_gpt2) for s in (0, 1)]
    with torch.no_grad():
        for m in ms:
            m.gate[:8] = 1.5                       # the same 8 RAM dims in both seeds
        ms[1].gate[8:12] = 1.5
    (m,) = ram_overlap(ms)
    assert m.value == 1.0 and m.n == 8 and m.control_value < 0.25 and m.p_value < 1e-6


def test_random_dims_match_the_gate_mass_they_remove():
    from lab.rlf.probes import mass_matched_dims
    gate = np.ones(64)
    gate[:4] = 3.0                                   # the "RAM" dims: the largest gates
    rng = np.random.default_rng(0)
    rand = mass_matched_dims(gate, [0, 1, 2, 3], rng)
    assert not set(rand) & {0, 1, 2, 3} and abs(gate[rand].sum() - 12.0) <= 1.0 and len(rand) == 12


# --- training, evaluation --------------------------------------------------------------------------

def test_training_is_seeded_and_resumable(smoke_gpt2, tmp_path):
    from lab.rlf import Config
    from lab.rlf.train import train
    cfg = Config.preset("smoke", steps=6, eval_every=3, ckpt_every=3, val_n_per_hop=2)
    full = train(cfg, smoke_gpt2, tmp_path / "full")
    part = train(cfg, smoke_gpt2, tmp_path / "resumed", stop_after=3)
    assert part.manifest == {"stopped_at": 3}
    resumed = train(cfg, smoke_gpt2, tmp_path / "resumed")
    assert resumed.manifest["metrics"]["resumed_from"] == 3
    for k, v in full.tensors.items():
        assert torch.allclose(v, resumed.tensors[k], atol=1e-6), k
    hist = full.manifest["metrics"]["history"]
    assert [h["step"] for h in hist] == [3, 6] and all("val_acc" in h for h in hist)
    # time spent in validation passes is kept, cumulative, and carried across a resume
    for h in (hist, resumed.manifest["metrics"]["history"]):
        assert 0 < h[0]["eval_seconds"] <= h[1]["eval_seconds"] < h[1]["seconds"]
    # a checkpoint of another config with the same shapes (another loop start) is never resumed
    train(cfg, smoke_gpt2, tmp_path / "other", stop_after=3)
    with pytest.raises(LabError, match="another training spec or config"):
        train(cfg.with_(base_blocks=1), smoke_gpt2, tmp_path / "other")


def test_training_can_stop_at_a_validation_target_and_resume(smoke_gpt2, tmp_path):
    """stop_at_val (time-to-accuracy benches) ends the run at the first validation at or above it, keeps a
    resumable checkpoint and its history; a run that never reaches it trains to the end."""
    from lab.rlf import Config
    from lab.rlf.train import train
    cfg = Config.preset("smoke", steps=6, eval_every=2, ckpt_every=6, val_n_per_hop=2)
    early = train(cfg, smoke_gpt2, tmp_path / "early", stop_at_val=0.0)   # any validation meets 0.0
    assert early.manifest["stopped_at"] == 2 and [h["step"] for h in early.manifest["history"]] == [2]
    assert early.path.name == ".early.ckpt" and not (tmp_path / "early").exists()
    done = train(cfg, smoke_gpt2, tmp_path / "early")                       # resumes from step 2
    assert done.manifest["metrics"]["resumed_from"] == 2
    assert [h["step"] for h in done.manifest["metrics"]["history"]] == [2, 4, 6]
    never = train(cfg, smoke_gpt2, tmp_path / "never", stop_at_val=1.01)
    assert [h["step"] for h in never.manifest["metrics"]["history"]] == [2, 4, 6]


def test_half_precision_base_trains_and_explains(smoke_gpt2, tmp_path):
    """A bf16 base (as users run on GPUs): the trainable gate and core stay float32 and compute in float32,
    the frozen base's head reads its own dtype, and training, inference, explain and the probes run."""
    from lab.bases import load_base
    from lab.rlf import Config
    from lab.rlf.data import heldout_set
    from lab.rlf.infer import explain, solve
    from lab.rlf.model import encode_prompts
    from lab.rlf.probes import attribute, collect_latents
    from lab.rlf.train import load, supervision, train
    base = load_base(smoke_gpt2.path, device=smoke_gpt2.device, dtype=torch.bfloat16)
    assert base.dtype == torch.bfloat16
    cfg = Config.preset("smoke", steps=3, eval_every=3, ckpt_every=3, val_n_per_hop=2)
    art = train(cfg, base, tmp_path / "bf16", progress=False)
    hist = art.manifest["metrics"]["history"]
    assert hist and all(np.isfinite(h["loss"]) for h in hist)
    m = load(art.path, base)
    params = dict(m.named_parameters())
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert all(p.device == base.device for p in params.values())
    probs = heldout_set(2, 500)[:4]
    ids, mask = encode_prompts(base, [p.prompt for p in probs])
    targets, weights = supervision(m, probs, cfg)
    loss = m.loss(ids, mask, targets, weights)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in params.values())
    m.zero_grad()
    with torch.no_grad():
        logits = m.run(ids, mask, 3)
    assert logits.shape == (3, 4, base.unembed.weight.shape[0]) and logits.dtype == torch.float32
    assert (logits[:, :, m.answer_bias < 0] < -1e8).all() and torch.isfinite(logits).all()  # the mask stays finite
    tr = solve(m, [p.prompt for p in probs], 5)
    assert tr.preds.shape[0] == 4 and 1 <= tr.preds.shape[1] <= 5
    ex = explain(m, probs[0].prompt, 5)
    K = len(ex["loops"])
    assert 1 <= K <= 5 and ex["latents"].shape == (K, base.d_model) and ex["latents"].dtype == np.float32
    assert np.isfinite(ex["latents"]).all() and ex["truth"] == list(probs[0].path)
    lat = collect_latents(m, probs)
    assert lat.X.shape == (sum(p.hops + 1 for p in probs), base.d_model) and np.isfinite(lat.X).all()
    a = attribute(m, probs[0], n_steps=2)
    assert a["attr"].shape == (probs[0].hops + 1, len(a["tokens"])) and np.isfinite(a["attr"]).all()


def test_adaptive_curriculum_opens_the_next_hop_only_when_the_newest_is_learned():
    from lab.rlf import Config
    from lab.rlf.data import train_batch
    from lab.rlf.train import HopCurriculum
    cfg = Config.preset("smoke", max_train_hops=3, curriculum_steps=3000, curriculum_threshold=0.75,
                        curriculum_window=8)
    cur = HopCurriculum(cfg)
    assert cur.cap(0) == 1
    cur.observe(0, [1] * 4, [True] * 4)           # window not yet full: stays closed
    assert cur.cap(1) == 1
    cur.observe(1, [1] * 4, [False] * 4)          # 4 of 8 right < 0.75
    assert cur.cap(2) == 1
    cur.observe(2, [1] * 4, [True] * 4)           # last 8: 4 wrong + 4 right... still 0.5
    assert cur.cap(3) == 1
    cur.observe(3, [1] * 4, [True] * 4)           # last 8 all right: hop 2 opens at the next step
    assert cur.cap(4) == 2 and cur.opened_at == {1: 0, 2: 4}
    cur.observe(4, [1] * 4 + [2] * 4, [True] * 8)  # only the newest hop count's outcomes decide
    assert cur.cap(5) == 2
    state = json.loads(json.dumps(cur.state_dict()))  # JSON round trip, as in a checkpoint
    again = HopCurriculum(cfg)
    again.load_state_dict(state)
    for c in (cur, again):
        c.observe(5, [2] * 4, [True] * 4)
        c.observe(6, [3] * 4, [True] * 4)           # hop 3 is not open: its outcomes cannot open hop 4
        assert c.cap(7) == 3 and c.opened_at[3] == 6
    assert cur.state_dict() == again.state_dict()
    assert HopCurriculum(cfg).cap(999) == 1 and HopCurriculum(cfg).cap(1000) == 2  # the fixed schedule still opens hops
    off = HopCurriculum(cfg.with_(curriculum_threshold=0.0))
    off.observe(0, [1] * 64, [True] * 64)
    assert off.cap(1) == 1
    with pytest.raises(LabError, match="curriculum_threshold"):
        Config.preset("smoke", curriculum_threshold=1.5)
    # error-weighted sampling: open hop counts drawn by 0.1 + recent training error
    err = HopCurriculum(cfg.with_(hop_sampling="error", curriculum_threshold=0.0))
    assert err.hop_weights(0) == [1.1]
    err.observe(0, [1] * 8, [True] * 6 + [False] * 2)
    assert err.hop_weights(1) == pytest.approx([0.35])
    err.adaptive_cap = 2
    assert err.hop_weights(1) == pytest.approx([0.35, 1.1])   # a hop count not yet seen counts as all wrong
    assert HopCurriculum(cfg).hop_weights(0) is None
    with pytest.raises(LabError, match="hop_sampling"):
        Config.preset("smoke", hop_sampling="uniform")
    with pytest.raises(LabError, match="hop_weights"):
        train_batch(0, 4, cap=2, hop_weights=[1.0])
    batch = train_batch(0, 64, cap=3, hop_weights=[0.0, 0.0, 1.0])
    assert {p.hops for p in batch} == {3}


def test_training_with_an_adaptive_curriculum_resumes_exactly(smoke_gpt2, tmp_path, monkeypatch):
    from lab.rlf import Config
    from lab.rlf.model import RLF
    from lab.rlf.train import train
    # a smoke model answers nothing right in 8 steps: report every training answer right, so hop counts
    # open at once (steps 1 and 2), and the resumed half (from step 5) must take its cap from the checkpoint
    loss = RLF.loss
    monkeypatch.setattr(RLF, "loss", lambda self, *a, **k: (lambda out: (out[0], torch.ones_like(out[1])))(
        loss(self, *a, **k)) if k.get("return_correct") else loss(self, *a, **k))
    cfg = Config.preset("smoke", steps=8, eval_every=4, ckpt_every=2, val_n_per_hop=2, curriculum_steps=100_000,
                        curriculum_threshold=0.9, curriculum_window=4)
    full = train(cfg, smoke_gpt2, tmp_path / "full")
    assert full.manifest["metrics"]["curriculum_opened_at"] == {1: 0, 2: 1, 3: 2}
    train(cfg, smoke_gpt2, tmp_path / "resumed", stop_after=5)
    resumed = train(cfg, smoke_gpt2, tmp_path / "resumed")
    assert resumed.manifest["metrics"]["resumed_from"] == 5
    for k, v in full.tensors.items():
        assert torch.allclose(v, resumed.tensors[k], atol=1e-6), k
    m, r = full.manifest["metrics"], resumed.manifest["metrics"]
    assert m["curriculum_opened_at"] == r["curriculum_opened_at"]
    assert [h["hops_open"] for h in m["history"]] == [h["hops_open"] for h in r["history"]] == [3, 3]


def test_baselines_and_controls_must_be_trained_like_the_method(rlf_smoke, smoke_gpt2):
    """A baseline trained with another recipe (lr, width, curriculum) would measure the recipe, not its
    switch: evaluate and the gate null refuse it, naming each differing field."""
    from lab.rlf import Config
    from lab.rlf.config import VARIANT_FIELDS
    from lab.rlf.evaluate import evaluate
    from lab.rlf.model import build
    from lab.rlf.probes import gate_partition
    other_recipe = build(Config.preset("smoke", lifeline=False, lr=5e-3), smoke_gpt2)
    with pytest.raises(LabError, match=r"baseline 'no lifeline'.*lr: method 0\.001, baseline 'no lifeline' 0\.005"):
        evaluate(rlf_smoke, baselines={"no lifeline": other_recipe}, n=4, max_hops=2, progress=False)
    wider = build(Config.preset("smoke", shuffle_supervision=True, seed=1, d_core=32), smoke_gpt2)
    with pytest.raises(LabError, match=r"control run.*d_core: method 64, control run 32"):
        gate_partition(rlf_smoke, [wider, wider])
    # the switch, the seed and evaluation-only fields may differ
    switched = Config.preset("smoke", lifeline=False, seed=3, test_n=7, eval_every=5)
    assert Config.preset("smoke").training_differences(switched, allowed=VARIANT_FIELDS) == {}


def test_evaluate_report_has_per_hop_measures_baselines_and_ablations(rlf_smoke, tmp_path):
    from lab.rlf.evaluate import ABLATIONS, evaluate
    rep = evaluate(rlf_smoke, baselines={"same model (sanity)": rlf_smoke}, n=8, max_hops=4, progress=False)
    names = [m.name for m in rep.measures]
    for h in range(1, 5):
        for what in ("final-answer acc", "full-trace acc", "HALT recall"):
            m = rep.measure(f"RLF {h}-hop {what}")
            assert m.n == 8 and m.ci_low <= m.value <= m.ci_high
        for abl in ABLATIONS:
            assert f"lifeline {abl} {h}-hop final-answer acc" in names
    for table in ("per-loop state norms (answer position)", "final-answer accuracy by prompt length (RLF)",
                  "length-controlled test sets (RLF)", "per training seed (final-answer accuracy)"):
        assert rep.tables[table], table
    assert "rlf_state_norms" in rep.figures
    unchanged = rep.measure("loop predictions unchanged with lifeline zeroed (share per correct trace)") if any(
        m.name.startswith("loop predictions unchanged") for m in rep.measures) else None
    if unchanged is not None:   # beside a control that can differ from it (not 1 by definition)
        assert unchanged.control == "another problem's lifeline in its place"
    assert not any("lifeline removable" in p.claim for p in rep.published.values())   # a GPT-2 run: not beside it
    same = rep.measure("in-dist final-answer acc, baseline same model (sanity)")
    assert same.p_value == 1.0 and same.value == same.control_value   # identical arm: no discordant pairs
    assert {"rlf_final_by_hops", "rlf_trace_by_hops", "rlf_halt_by_hops"} <= set(rep.figures)
    assert "where wrong traces first break (RLF)" in rep.tables
    assert rep.published  # headline measures answer a published figure
    out = rep.save(tmp_path / "rep", formats=("html",))
    assert (out / "report.md").exists() and (out / "figures" / "rlf_final_by_hops.html").exists()


def test_removability_claim_only_beside_the_paper_configuration():
    """The published removability claim is about the Mamba2 base and core with the upper blocks re-run in every loop:
    a Mamba2 core on the lab's standard loop, or a GPT-2 base, must not carry it."""
    from lab.rlf.evaluate import _published
    has = {(arch, core, loop): "lifeline" in _published(arch, core, loop)
           for arch in ("gpt2", "mamba2") for core in ("transformer", "mamba2") for loop in ("standard", "paper")}
    assert [k for k, v in has.items() if v] == [("mamba2", "mamba2", "paper")]


def test_base_lookup_is_the_greedy_first_word_against_a_guess_among_the_page(smoke_gpt2, lab_home):
    """The base's first decoded word agrees with transformers' own greedy generate, one unpadded prompt at a time
    (the lab decodes padded batches); base_lookup's accuracy is that word against path[0], and its control is the
    mean of 1 / (distinct right-hand sides on each page)."""
    import re

    from lab.rlf.data import heldout_set
    from lab.rlf.evaluate import LOOKUP_CONTROL, base_cot, base_lookup
    ms = base_lookup(smoke_gpt2, hops=(1, 2), n=24)
    assert [m.extra["hops"] for m in ms] == [1, 2] and all(m.n == 24 and m.control == LOOKUP_CONTROL for m in ms)
    tok = smoke_gpt2.tokenizer
    for m, hops in zip(ms, (1, 2)):
        right, guess, first_words = [], [], []
        problems = heldout_set(hops, 24, 0)
        for p in problems:
            ids = tok(p.prompt, return_tensors="pt").input_ids
            gen = smoke_gpt2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=hops + 2,
                                            do_sample=False, pad_token_id=tok.pad_token_id)
            words = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0].split()
            first_words.append(words[0] if words else "")
            right.append(bool(words) and words[0] == p.path[0])
            guess.append(1 / len(set(re.findall(r"= (\w+)\.", p.prompt))))
        assert base_cot(smoke_gpt2, problems, batch_size=7)["first_word"].tolist() == first_words
        assert any(first_words)   # the smoke base decodes words (a real comparison, not "" against "")
        assert m.value == pytest.approx(np.mean(right)) and m.control_value == pytest.approx(np.mean(guess))
        assert 0 <= m.ci_low <= m.value <= m.ci_high <= 1 and 0 < m.p_value <= 1


def test_first_errors_classify_where_a_trace_breaks(rlf_smoke):
    import numpy as np

    from lab.rlf.data import Problem
    from lab.rlf.evaluate import ERROR_KINDS, first_error_table, first_errors
    from lab.rlf.infer import Trace
    w = rlf_smoke.vocab.word_id
    halt = rlf_smoke.vocab.halt_id
    p = Problem("SX = P. P = D. RJ = D. D = willow. ZD = cobalt. K = M. M = Q. Q = amber. What is SX?\nAnswer:",
                "SX", ("P", "D", "willow"), 3, 3)
    preds = {  # what each loop emitted -> expected first error (None: a right trace)
        ("P", "D", "willow", halt): None,
        ("P", "P", "willow", halt): (1, ERROR_KINDS[0]),        # stays on the name it should dereference
        ("P", "SX", "willow", halt): (1, ERROR_KINDS[1]),       # goes back up the chain
        ("P", "willow", halt, halt): (1, ERROR_KINDS[2]),       # skips a step
        ("P", halt, halt, halt): (1, ERROR_KINDS[3]),
        ("cobalt", "D", "willow", halt): (0, ERROR_KINDS[4]),   # reads a distractor's assignment
        ("RJ", "D", "willow", halt): (0, ERROR_KINDS[5]),
        ("P", "Q", "willow", halt): (1, ERROR_KINDS[6]),        # the twin chain K-M-Q-amber at the same depth
        ("P", "D", "amber", halt): (2, ERROR_KINDS[6]),
        ("P", "M", "willow", halt): (1, ERROR_KINDS[4]),        # the twin chain, but at another depth
        ("P", "D", "willow", "willow"): None,                   # only the HALT missed: HALT recall's business
    }
    for emitted, want in preds.items():
        ids = np.array([[x if isinstance(x, int) else w[x] for x in emitted]])
        hl = np.where(ids[0] == halt)[0]
        tr = Trace(ids, np.array([hl[0] if len(hl) else -1]), np.array([-1]), halt)
        rows = first_errors(rlf_smoke, [p], tr)
        assert (rows[0]["loop"], rows[0]["kind"]) == want if want else rows == [], emitted
    table = first_error_table([{"hops": 3, "loop": 1, "kind": ERROR_KINDS[0]}] * 2, [3], {3: 10})
    assert table == [{"hops": 3, "n": 10, "first wrong loop": 1, "kind": ERROR_KINDS[0], "count": 2, "share of problems": 0.2}]


def test_lifeline_interventions_change_the_loop(rlf_smoke):
    from lab.rlf.data import heldout_set
    from lab.rlf.model import Lifeline, encode_prompts
    probs = heldout_set(2, 500)[:6]
    ids, mask = encode_prompts(rlf_smoke.base, [p.prompt for p in probs])
    with torch.no_grad():
        on = rlf_smoke.run(ids, mask, 3)
        same = rlf_smoke.run(ids, mask, 3, lifeline=Lifeline())
        assert torch.equal(on, same)
        for mode in ("zero", "zero_matched", "noise", "shuffle", "other"):
            assert not torch.allclose(on[1:], rlf_smoke.run(ids, mask, 3, lifeline=Lifeline(mode=mode))[1:]), mode
        # from_loop: the loops before it run as trained
        late = rlf_smoke.run(ids, mask, 3, lifeline=Lifeline(mode="zero", from_loop=1))
        assert torch.equal(late[0], on[0]) and not torch.allclose(late[1:], on[1:])
        # norm-matched zero: the state the core reads keeps the intact run's norm at every loop
        from lab.hooks import ActivationCache
        c_on, c_m, c_z = ActivationCache(), ActivationCache(), ActivationCache()
        rlf_smoke.run(ids, mask, 3, cache=c_on)
        rlf_smoke.run(ids, mask, 3, lifeline=Lifeline(mode="zero_matched"), cache=c_m)
        rlf_smoke.run(ids, mask, 3, lifeline=Lifeline(mode="zero"), cache=c_z)
        n_on, n_m, n_z = (c.stack("after_lifeline", prefix="loop").norm(dim=-1) for c in (c_on, c_m, c_z))
        assert torch.allclose(n_m, n_on, rtol=1e-4) and not torch.allclose(n_z, n_on, rtol=1e-2)
        assert torch.count_nonzero(c_m["loop.1.lifeline"]) == 0
        # loop 0's prediction is already past the lifeline add, so a zero lifeline changes loop 0 too, unless scale
        assert not torch.allclose(on, rlf_smoke.run(ids, mask, 3, lifeline=Lifeline(scale=0.3)))
    with pytest.raises(LabError, match="mode"):
        Lifeline(mode="off")
    with pytest.raises(LabError, match="from_loop must be a whole number >= 0, got -1"):
        Lifeline(from_loop=-1)
    with pytest.raises(LabError, match=r"ram_dims must be a list of non-negative int dimensions, got \[1, -2\]"):
        Lifeline(ram_dims=[1, -2])
    with pytest.raises(LabError, match="alu_dims must be a list"):
        Lifeline(alu_dims=[0.5])
    d = rlf_smoke.gate.numel()
    with pytest.raises(LabError, match=rf"alu_dims \[{d}\] are out of range for a gate of width {d}"):
        rlf_smoke.run(ids, mask, 1, lifeline=Lifeline(alu_dims=[0, d], alu_scale=0.0))


def test_explorer_view_equals_a_direct_run_whatever_it_keeps(rlf_smoke):
    """The explorer keeps each prompt's knob-free runs; a view must still equal running the loop with those
    knobs from scratch, in any order of moves."""
    from lab.rlf.data import heldout_set
    from lab.rlf.explore import Explorer
    from lab.rlf.infer import explain
    from lab.rlf.model import Lifeline
    probs = heldout_set(2, 500)
    ex = Explorer(rlf_smoke, background_problems=probs[:8])
    prompt, cap = probs[9].prompt, 4
    for knobs in [dict(), dict(scale=0.4), dict(lifeline=False), dict(ram_scale=2.0, alu_scale=0.0), dict()]:
        v = ex.view(prompt, cap=cap, **knobs)
        ll = ex.lifeline(knobs.get("lifeline", True), knobs.get("scale", 1.0), knobs.get("ram_scale", 1.0),
                         knobs.get("alu_scale", 1.0))
        cur, off, ref = explain(rlf_smoke, prompt, cap, [ll, Lifeline(mode="zero"), Lifeline()])
        assert v["preds"] == [lp["pred"] for lp in cur["loops"]], knobs
        assert v["preds_off"] == [lp["pred"] for lp in off["loops"]]
        np.testing.assert_allclose(v["moved"], np.linalg.norm(cur["latents"] - ref["latents"], axis=1), atol=1e-6)
        for site in ("core reads", "after loop"):   # the norm trace is the direct run's, under these knobs
            np.testing.assert_allclose(v["norms"]["these settings"][site], cur["norms"][site], rtol=1e-5)
            np.testing.assert_allclose(v["norms"]["lifeline off"][site], off["norms"][site], rtol=1e-5)
        assert [tr["name"] for tr in v["figures"]["norms"].data] == [
            f"{site}, {arm}" for arm in ("these settings", "lifeline off") for site in ("core reads", "after loop")]
    assert (v["moved"] == 0).all()   # every knob back at 1: the view is the run as trained
    # with the loop norm on, the state a loop hands on has the norm the loop norm's weights give it, lifeline or not
    w = rlf_smoke.loop_norm.weight.detach().float()
    assert rlf_smoke.config.loop_norm
    np.testing.assert_allclose(v["norms"]["lifeline off"]["after loop"], float(w.square().sum().sqrt()), rtol=0.1)


# --- probes ----------------------------------------------------------------------------------------

def test_probes_on_smoke(rlf_smoke, smoke_gpt2, request):
    from lab.rlf import Config
    from lab.rlf.data import heldout_set
    from lab.rlf.model import build
    from lab.rlf.probes import (
        attribution_heatmap,
        attribution_test,
        gate_ablation,
        gate_partition,
        partition_ablations,
        spread,
        state_probe,
        trajectories,
        trajectory_figure,
    )
    probs = [p for h in (1, 2, 3) for p in heldout_set(h, 500)[:10]]
    tr = trajectories(rlf_smoke, probs, "pca")
    assert tr["xy_on"].shape == (sum(p.hops + 1 for p in probs), 2) and tr["xy_off"].shape == tr["xy_on"].shape
    assert len(trajectory_figure(tr, "state").data) >= 3
    sp = state_probe(tr["on"])["measure"]
    assert 0 <= sp.value <= 1 and sp.control == "probe on shuffled labels" and sp.n > 0
    # two control "runs": perturbed gates stand in for shuffled-supervision models
    nulls = []
    for s in (1, 2):
        m = build(Config.preset("smoke", seed=s), smoke_gpt2)
        with torch.no_grad():
            m.gate.add_(torch.randn(m.gate.shape, generator=torch.Generator().manual_seed(s)) * 0.01)
        nulls.append(m)
    saved_gate = rlf_smoke.gate.detach().clone()  # the fixture is session-wide: restore it for later tests
    request.addfinalizer(lambda: rlf_smoke.gate.data.copy_(saved_gate))
    with torch.no_grad():
        rlf_smoke.gate[:4] = torch.tensor([1.5, 1.2, 0.5, 0.8])
    part = gate_partition(rlf_smoke, nulls)
    lo, hi = part["null_thresholds"]
    assert lo < 1 < hi and {0, 1} <= set(part["null"]["ram"].tolist()) and {2, 3} <= set(part["null"]["alu"].tolist())
    assert {0, 1} <= set(part["published"]["ram"].tolist())
    abl = gate_ablation(rlf_smoke, probs[:10], part["null"], scales=(0.0,))
    assert any(m.extra["control"] for m in abl) and any(not m.extra["control"] for m in abl)
    empty = {"ram": np.array([], dtype=int), "alu": np.array([], dtype=int)}
    both, notes = partition_ablations(rlf_smoke, probs[:4], {**part, "null": empty}, scales=(0.0,))
    assert {m.extra["rule"] for m in both} == {"published rule"} and notes == [
        "gate ablation (null-calibrated rule): the rule selects no dimension, nothing to ablate"]
    vs = [m for m in abl if m.extra.get("vs_random")]  # the partition arm against the random arm, paired
    assert vs and all(m.control.startswith("random") and m.p_value is not None for m in vs)
    ram_x0 = next(m for m in abl if m.name == "value accuracy, RAM x0")  # 1-hop problems: value and HALT loops
    assert next(m for m in vs if m.name.startswith("value accuracy, RAM x0")).value == ram_x0.value
    picked = spread(probs, 3)  # probs run 1-, 2-, 3-hop in order: an even spread takes one of each
    assert [p.hops for p in picked] == [1, 2, 3] and spread(probs[:2], 3) == probs[:2]
    at = attribution_test(rlf_smoke, picked, n_steps=4)
    assert at["example"]["problem"].hops == 3 and at["example"]["attr"].shape[0] == 3 + 1
    assert 0 <= at["measure"].value <= 1 and at["measure"].p_value is not None
    assert [m.name.split(":")[0] for m in at["per_loop"]] == ["loop 0", "loop 1", "loop 2"]
    assert sum(m.n for m in at["per_loop"]) == at["measure"].n == 1 + 2 + 3
    attribution_heatmap(at["example"])


def test_umap_trajectory_supported(rlf_smoke):
    from lab.rlf.data import heldout_set
    from lab.rlf.probes import trajectories
    tr = trajectories(rlf_smoke, heldout_set(1, 500)[:8], "umap", overlay_off=False)
    assert tr["xy_on"].shape == (16, 2)


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(rlf_smoke, smoke_mamba2, tmp_path):
    from lab.rlf.infer import explain, solve
    from lab.rlf.train import load
    good = "K = walnut. R = K. What is R?\nAnswer:"
    with pytest.raises(LabError, match="answer marker"):
        explain(rlf_smoke, "K = walnut. What is K?", 4)
    with pytest.raises(LabError, match="answer marker"):
        solve(rlf_smoke, ["K = walnut. What is K?"], 4)
    with pytest.raises(LabError, match="'R' is not defined"):
        explain(rlf_smoke, "K = walnut. What is R?\nAnswer:", 4)
    with pytest.raises(LabError, match="context"):
        explain(rlf_smoke, " ".join("K = walnut." for _ in range(400)) + " What is K?\nAnswer:", 4)
    for cap in (0, -3):
        with pytest.raises(LabError, match="loop cap"):
            explain(rlf_smoke, good, cap)
        with pytest.raises(LabError, match="loop cap"):
            solve(rlf_smoke, [good], cap)
    with pytest.raises(LabError, match="trained on base 'smoke-gpt2'"):
        load(rlf_smoke.artifact.path, smoke_mamba2)
    from lab.rlf import Config
    with pytest.raises(LabError, match="core"):
        Config.preset("smoke", core="lstm")
    with pytest.raises(LabError, match="preset"):
        Config.preset("huge")


# --- app, CLI --------------------------------------------------------------------------------------

def test_app_page_recomputes_live(rlf_smoke, lab_home):
    from streamlit.testing.v1 import AppTest
    page = Path(__file__).resolve().parents[1] / "app" / "pages" / "1_Recursive_Latent_Forcing.py"
    at = AppTest.from_file(str(page), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    at.selectbox(key="rlf-base").set_value("smoke-gpt2").run()
    assert not at.exception, at.exception

    def outputs():
        return (json.dumps([c.proto.spec for c in at.get("plotly_chart")])[:100000],
                at.dataframe[0].value.to_json(), at.markdown[0].value if at.markdown else "")

    before = outputs()
    # the charts carry the lab template itself: a template name in an unvalidated figure reaches plotly.js
    # (and kaleido's export) unresolved
    from lab.figures import LAB_COLORS
    for chart in at.get("plotly_chart"):
        assert json.loads(chart.proto.spec)["layout"]["template"]["layout"]["colorway"][0] == LAB_COLORS[0]
    at.slider(key="rlf-scale").set_value(0.2).run()
    assert not at.exception, at.exception
    after_scale = outputs()
    assert after_scale[0] != before[0]
    at.toggle(key="rlf-lifeline").set_value(False).run()
    assert not at.exception
    assert outputs()[0] != after_scale[0]
    cap = at.number_input(key="rlf-cap")
    if cap.min is not None and cap.min >= 1:   # the widget itself refuses a cap below one loop
        assert cap.min == 1
    else:
        cap.set_value(0).run()
        assert any("loop cap" in e.value for e in at.error)


def test_app_page_on_a_paper_loop_run(smoke_mamba2, lab_home):
    """The page on the Mamba2 configuration's paper loop: it names how the run was built, shows the per-loop norm
    trace, and the lifeline toggle changes what it shows."""
    from streamlit.testing.v1 import AppTest

    from lab.rlf import Config, train_or_load
    cfg = Config.preset("smoke", base="smoke-mamba2", core="mamba2", loop="paper", base_blocks=-1, d_core=32,
                        mamba_head_dim=16, lora_rank=4, steps=4, eval_every=4, ckpt_every=4, val_n_per_hop=2,
                        null_runs=0)
    art = train_or_load(cfg, smoke_mamba2).artifact.path
    page = Path(__file__).resolve().parents[1] / "app" / "pages" / "1_Recursive_Latent_Forcing.py"
    at = AppTest.from_file(str(page), default_timeout=120)
    at.run()
    at.selectbox(key="rlf-base").set_value("smoke-mamba2").run()
    assert not at.exception, at.exception
    choice = next(o for o in at.selectbox(key="rlf-artifact").options if art.name in o)
    at.selectbox(key="rlf-artifact").set_value(choice).run()
    assert not at.exception, at.exception
    assert any("paper loop" in c.value and "loop norm on" in c.value for c in at.caption)
    charts = lambda: {json.loads(c.proto.spec)["layout"]["title"]["text"]: c.proto.spec  # noqa: E731
                      for c in at.get("plotly_chart")}
    before = charts()
    norms = next(t for t in before if t.startswith("Per-loop state norm"))
    at.toggle(key="rlf-lifeline").set_value(False).run()
    assert not at.exception, at.exception
    after = charts()
    assert after[norms] != before[norms]


def test_cli_train_and_evaluate_smoke(smoke_gpt2, lab_home, tmp_path):
    from typer.testing import CliRunner

    from lab.cli import app
    r = CliRunner().invoke(app, ["train", "rlf", "--preset", "smoke", "--steps", "4", "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    assert "validation final-answer acc" in r.output
    # the whole pipeline (method, baselines, null controls, evaluation, probes), on its own seed so it trains
    # into folders of its own
    r = CliRunner().invoke(app, ["evaluate", "rlf", "--preset", "smoke", "--seed", "7", "--steps", "4", "--test-n", "6",
                                 "--out", str(tmp_path / "rep"), "--formats", "html"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").exists()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    names = {m["name"] for m in rep["measures"]}
    assert "in-dist final-answer acc, baseline no lifeline" in names and "RAM fraction (published rule: gate > 1.01)" in names
    assert len(rep["provenance"]["null_runs"]) == 2


def test_train_or_load_reuses_an_artifact_whatever_the_pipeline_sizes(rlf_smoke, smoke_gpt2):
    """The sizes `run` reads after training (control runs, probe problems) are not part of a run: an artifact
    trained under other sizes, or saved before they existed, is the same run, and its config.json lacks them."""
    from lab.rlf import Config, train_or_load
    from lab.rlf.config import PIPELINE_FIELDS
    from lab.store import read_json
    path = rlf_smoke.artifact.path
    stamp = read_json(path / "manifest.json")["metrics"]["trained_at"]
    assert not set(PIPELINE_FIELDS) & set(read_json(path / "config.json"))
    cfg = Config.preset("smoke", probe_n=5, probe_attr_n=0, probe_umap=True, null_runs=0)
    m = train_or_load(cfg, smoke_gpt2)
    assert m.artifact.path == path and read_json(path / "manifest.json")["metrics"]["trained_at"] == stamp
    assert m.config == cfg  # the caller's sizes, on the same trained run
    assert Config.preset("smoke").null_controls() == [Config.preset("smoke", shuffle_supervision=True, seed=s)
                                                      for s in (1, 2)]
    assert set(Config.preset("smoke").baselines()) == {"no lifeline", "no loop-RoPE", "answer-only supervision"}


def test_task_version_is_recorded_and_old_versions_are_not_retrained():
    from lab.rlf import Config
    from lab.rlf.data import TASK_VERSION
    from lab.rlf.train import train
    cfg = Config.preset("smoke")
    assert cfg.task_version == TASK_VERSION and Config.from_dict(cfg.to_dict()).task_version == TASK_VERSION
    old = {k: v for k, v in cfg.to_dict().items() if k != "task_version"}  # saved before the field existed
    assert Config.from_dict(old).task_version == 1
    with pytest.raises(LabError, match="task version 1"):
        train(Config.from_dict(old))
