"""Shared fixtures: a private LAB_HOME with the smoke bases (seconds of pretraining), CPU only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.pretrain import ensure_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/lab-numba-cache")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not CI logs


@pytest.fixture(scope="session")
def lab_home(tmp_path_factory) -> Path:
    """A LAB_HOME for the whole session (LAB_TEST_HOME reuses one across runs, for speed)."""
    home = Path(os.environ.get("LAB_TEST_HOME") or tmp_path_factory.mktemp("labhome"))
    os.environ["LAB_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def smoke_gpt2(lab_home):
    return ensure_base("smoke-gpt2")


@pytest.fixture(scope="session")
def smoke_mamba2(lab_home):
    return ensure_base("smoke-mamba2")


def _tiny_random(tmp_path_factory, family: str):
    """A tiny random Llama/Qwen2 saved to a temp dir with the lab tokenizer (no download)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        Qwen2Config,
    )

    from lab.corpus import load_tokenizer
    tok = load_tokenizer()
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    cfg = cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    # transformers picks the family's own tokenizer class, which may add tokens (Qwen2 adds
    # <|endoftext|>): size the embedding to what AutoTokenizer will actually load.
    cfg.vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(lab_home, tmp_path_factory):
    return _tiny_random(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(lab_home, tmp_path_factory):
    return _tiny_random(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session", params=["smoke-gpt2", "smoke-mamba2", "llama", "qwen2"])
def any_base(request, lab_home, tmp_path_factory):
    """Every supported family once: the two lab presets and tiny random Llama / Qwen2."""
    from lab.bases import load_base
    if request.param.startswith("smoke"):
        return ensure_base(request.param)
    return load_base(str(_tiny_random(tmp_path_factory, request.param)))


@pytest.fixture(scope="session")
def rlf_smoke(smoke_gpt2, lab_home):
    """A smoke RLF model (transformer core) trained once per session into LAB_HOME."""
    from lab.rlf import Config, load, train_or_load
    cfg = Config.preset("smoke")
    return load(train_or_load(cfg, smoke_gpt2).artifact.path, smoke_gpt2)


@pytest.fixture(scope="session")
def smoke_results(smoke_gpt2, smoke_mamba2, lab_home):
    """`lab reproduce --preset smoke` once per session: every mechanism's smoke artifacts and report."""
    from lab.reproduce import reproduce
    return reproduce(preset="smoke", run="ci-smoke", seed=0)
