"""Bases: presets, load_base for every family, bad input, pretraining resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lab import LabError
from lab.bases import PRESETS, list_bases, load_base
from lab.pretrain import pretrain


def test_smoke_base_beats_unigram(smoke_gpt2):
    m = smoke_gpt2.meta
    assert m["heldout_loss"] < m["unigram_loss"], m
    assert m["heldout_tokens"] > 1000


def test_heldout_comparison_has_a_ci_and_pairs_the_unigram_on_the_same_tokens(smoke_gpt2):
    import numpy as np

    from lab.corpus import corpus_tokens, load_tokenizer
    from lab.pretrain import heldout_comparison, heldout_loss, unigram_window_losses

    p = PRESETS["smoke-gpt2"]
    r = heldout_comparison("smoke-gpt2", n_windows=40)
    loss, diff = r["loss"], r["vs_unigram"]
    tok = load_tokenizer()
    held = corpus_tokens(tok, "heldout", max(500, p.n_train_docs // 20))
    train = corpus_tokens(tok, "train", p.n_train_docs)
    assert loss.n == diff.n == 40
    assert loss.ci_low < loss.value < loss.ci_high
    # the same windows as the pretraining metric, and the unigram on exactly their targets
    assert loss.value == pytest.approx(heldout_loss(smoke_gpt2.model, held, p.seq_len, n_windows=40), rel=1e-5)
    uni = unigram_window_losses(train, held, len(tok), p.seq_len, 40)
    assert diff.control_value == pytest.approx(float(np.mean(uni)))
    assert diff.value == pytest.approx(loss.value - float(np.mean(uni)), abs=1e-9)
    assert diff.ci_high < 0 and diff.p_value < 0.05  # the smoke base beats the unigram on held-out text
    with pytest.raises(LabError, match="unknown preset"):
        heldout_comparison("nope")


def test_default_device_follows_lab_device(monkeypatch):
    from lab.bases import default_device
    monkeypatch.delenv("LAB_DEVICE", raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("LAB_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv("LAB_DEVICE", "gpu0")
    with pytest.raises(LabError, match="LAB_DEVICE='gpu0' is not a torch device"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("LAB_DEVICE", "cuda:1")
        with pytest.raises(LabError, match="no cuda device is available"):
            default_device()


def test_base_handles(any_base):
    b = any_base
    assert not b.model.training
    assert all(not p.requires_grad for p in b.model.parameters())
    assert b.n_layers == len(b.blocks) >= 2
    assert b.embed.weight.shape[1] == b.d_model
    ids, mask = b.encode(["K = walnut. What is K?\nAnswer:", "Hello"])
    assert ids.shape == mask.shape and mask[1].sum() < mask[0].sum()
    out = b.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # base.logits(final normed state) is exactly the model's head
    assert torch.equal(b.logits(out.hidden_states[-1], normed=True), out.logits)
    assert len(b.fingerprint) == 64


def test_load_local_directory_by_path(smoke_gpt2, lab_home):
    b = load_base(str(lab_home / "models" / "smoke-gpt2"))
    assert b.fingerprint == smoke_gpt2.fingerprint


def test_unknown_preset_or_path(lab_home):
    with pytest.raises(LabError, match="not a preset"):
        load_base("no-such-base")
    with pytest.raises(LabError, match="no such base path"):
        load_base("/nonexistent/model/dir")


def test_missing_preset_names_the_command(lab_home, monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    with pytest.raises(LabError, match="lab pretrain tiny-mamba2"):
        load_base("tiny-mamba2")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LabError, match="not a Hugging Face model directory"):
        load_base(str(tmp_path))


def test_unsupported_architecture(tmp_path, lab_home):
    from transformers import BertConfig
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(LabError, match="supported families are GPT-2"):
        load_base(str(tmp_path))


def test_corrupt_weights(smoke_gpt2, lab_home, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(lab_home / "models" / "smoke-gpt2", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated
    before = sorted(p.name for p in bad.iterdir())
    with pytest.raises(LabError, match="corrupt or truncated"):
        load_base(str(bad))
    assert sorted(p.name for p in bad.iterdir()) == before  # nothing written


def test_tokenizer_vocab_mismatch(smoke_gpt2, lab_home, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    smoke_gpt2.tokenizer.save_pretrained(d)
    with pytest.raises(LabError, match="tokenizer and model do not match"):
        load_base(str(d))


def test_text_longer_than_context(smoke_gpt2):
    with pytest.raises(LabError, match="longer than"):
        smoke_gpt2.encode("word " * (smoke_gpt2.max_len + 10))


def test_no_heldout_document_is_a_training_document():
    """The generators are templated, so two independent streams share documents verbatim (5.7% of 3,000
    held-out draws were among 60,000 training ones): held-out excludes the training prefix every preset uses."""
    from lab.corpus import TRAIN_GUARD_DOCS, documents
    assert all(p.n_train_docs <= TRAIN_GUARD_DOCS for p in PRESETS.values())
    held = documents("heldout", 2000)
    assert not set(held) & set(documents("train", TRAIN_GUARD_DOCS))
    assert documents("heldout", 50) == held[:50]  # deterministic, and a shorter split is a prefix
    # a caller training on more of a stream guards that much of it
    more = documents("heldout", 300, seed=7, guard_docs=TRAIN_GUARD_DOCS + 20_000)
    assert not set(more) & set(documents("train", TRAIN_GUARD_DOCS + 20_000, seed=7))
    with pytest.raises(LabError, match="non-negative int, got -1"):
        documents("heldout", -1)


def test_list_bases(smoke_gpt2):
    from lab.pretrain import loss_text, vs_unigram_text
    rows = {r["name"]: r for r in list_bases()}
    assert set(rows) == set(PRESETS)
    r = rows["smoke-gpt2"]
    assert r["on_disk"] and r["heldout_loss"] is not None
    lo, hi = r["heldout_loss_ci95"]
    assert lo < r["heldout_loss"] < hi and r["heldout_windows"] >= 2
    # the unigram paired on the same windows: the base beats it, significantly
    vs = r["vs_unigram"]
    assert vs["n"] == r["heldout_windows"] and vs["ci95"][1] < 0 and vs["delta"] < 0 and vs["p_value"] < 0.05
    assert vs["delta"] == pytest.approx(r["heldout_loss"] - vs["unigram_loss"])
    assert loss_text(r).startswith(f"{r['heldout_loss']:.3f} [{lo:.3f}, {hi:.3f}]") and "n = " in loss_text(r)
    assert "p = " in vs_unigram_text(r)
    older = {k: v for k, v in r.items() if k != "vs_unigram"}  # a base trained before the pairing was recorded
    assert vs_unigram_text(older).endswith("(unpaired)")
    assert loss_text({**r, "heldout_loss": None}) == "-"


def test_pretrain_resume_is_exact(lab_home, tmp_path, monkeypatch):
    """Interrupted at step 20 and resumed == uninterrupted, to the bit."""
    monkeypatch.setenv("LAB_HOME", str(lab_home))
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain("smoke-gpt2", steps=30, out_dir=a)
    assert pretrain("smoke-gpt2", steps=30, out_dir=b, stop_after=20) == {"stopped_at": 20}
    assert (tmp_path / ".b.ckpt" / "trainer.json").exists() and not b.exists()
    pretrain("smoke-gpt2", steps=30, out_dir=b)
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((p / "lab_base.json").read_text()) for p in (a, b))
    assert ma["heldout_loss"] == mb["heldout_loss"]
    lo, hi = ma["heldout_loss_ci95"]  # the pretraining metric carries its n and a CI over held-out windows
    assert lo < ma["heldout_loss"] < hi and ma["heldout_windows"] >= 2


def test_generate_is_the_greedy_argmax_continuation(smoke_gpt2):
    b = smoke_gpt2
    prompt = "On Monday at dawn,"
    ids = b.tokenizer.encode(prompt, add_special_tokens=False)
    new = []
    with torch.no_grad():  # greedy decoding written out: append the argmax of the last position's logits
        for _ in range(5):
            nxt = int(b.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == b.tokenizer.eos_token_id:
                break
    want = b.tokenizer.decode(new, skip_special_tokens=True)
    assert want and b.generate(prompt, max_new_tokens=5) == want


def test_corpus_token_cache_never_wraps_a_large_vocabulary(tmp_path, monkeypatch):
    """The token cache is uint16 for the lab's vocabulary; a tokenizer past 65,536 ids gets int32, same ids."""
    from lab.corpus import corpus_tokens, load_tokenizer

    monkeypatch.setenv("LAB_HOME", str(tmp_path))
    small = load_tokenizer()

    class LargeVocab:  # the lab tokenizer's ids, but a vocabulary (and EOS id) beyond uint16
        eos_token_id = 70_000

        def __len__(self):
            return 80_000

        def get_vocab(self):
            return {**small.get_vocab(), "<far>": 79_999}

        def __call__(self, docs, add_special_tokens=False):
            return small(docs, add_special_tokens=add_special_tokens)

    a, b = corpus_tokens(small, "heldout", 5), corpus_tokens(LargeVocab(), "heldout", 5)
    assert a.dtype.name == "uint16" and b.dtype.name == "int32"
    assert int(b.max()) == 70_000
    assert (b[b != 70_000] == a[a != small.eos_token_id]).all()
