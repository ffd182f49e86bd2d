"""Bases: the lab's own tiny pretrained models, and any Hugging Face causal LM, behind one `Base`.

    base = load_base("tiny-gpt2")            # a preset, trained by `lab pretrain tiny-gpt2`
    base = load_base("/path/to/hf/model")    # any local HF model directory
    base = load_base("Qwen/Qwen2.5-0.5B")    # a hub name, when the user has the hub

Supported families: GPT-2, Mamba2, Llama, Qwen2. Everything that reads or writes the residual
stream goes through `Base.blocks`, `Base.final_norm`, `Base.embed` and `Base.unembed`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import transformers
from packaging import version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, Mamba2Config

from lab import DOWNLOADS_ENV, LabError, downloads_allowed, models_dir
from lab.store import read_json

# Which attribute paths hold the parts of each supported family, and how its
# `output_hidden_states` tuple is laid out ("inputs": block inputs then the final normed state;
# "outputs": block outputs, the last one replaced by the final normed state).
ARCHITECTURES = {
    "gpt2": dict(blocks="transformer.h", final_norm="transformer.ln_f", embed="transformer.wte",
                 max_len="n_positions", hidden_layout="inputs"),
    # transformers' Mamba2 lists block outputs before 5.25 and, like the other families, block inputs from 5.25 on
    "mamba2": dict(blocks="backbone.layers", final_norm="backbone.norm_f", embed="backbone.embeddings", max_len=None,
                   hidden_layout="inputs" if version.parse(transformers.__version__) >= version.parse("5.25") else "outputs"),
    "llama": dict(blocks="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                  max_len="max_position_embeddings", hidden_layout="inputs"),
    "qwen2": dict(blocks="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                  max_len="max_position_embeddings", hidden_layout="inputs"),
}
SUPPORTED_FAMILIES = "GPT-2 (gpt2), Mamba2 (mamba2), Llama (llama), Qwen2 (qwen2)"
LAB_META = "lab_base.json"


@dataclass(frozen=True)
class BasePreset:
    """A tiny base the lab pretrains itself on its own corpus."""
    name: str
    arch: str
    d_model: int
    n_layers: int
    n_heads: int = 4          # attention heads (GPT-2) or SSM heads via head_dim (Mamba2)
    seq_len: int = 128        # training context
    batch_size: int = 32
    steps: int = 2000
    lr: float = 2e-3
    seed: int = 0
    n_train_docs: int = 60_000
    note: str = ""

    def hf_config(self, vocab_size: int, tokenizer):
        ids = dict(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.arch == "gpt2":
            # No dropout: training is then a pure function of (seed, step), so resume is exact.
            return GPT2Config(n_embd=self.d_model, n_layer=self.n_layers, n_head=self.n_heads,
                              n_positions=max(256, 2 * self.seq_len), resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0, tie_word_embeddings=True, **ids)
        if self.arch == "mamba2":
            head_dim = self.d_model * 2 // (self.n_heads * 2)
            return Mamba2Config(hidden_size=self.d_model, num_hidden_layers=self.n_layers, state_size=32,
                                expand=2, head_dim=head_dim, num_heads=2 * self.d_model // head_dim, n_groups=1,
                                chunk_size=64, tie_word_embeddings=True, residual_in_fp32=True, **ids)
        raise LabError(f"preset {self.name!r} has unsupported arch {self.arch!r}")


PRESETS: dict[str, BasePreset] = {p.name: p for p in [
    BasePreset("smoke-gpt2", "gpt2", d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=60,
               n_train_docs=4000, note="seconds of training; for tests and CI notebooks"),
    BasePreset("smoke-mamba2", "mamba2", d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=40,
               n_train_docs=4000, note="seconds of training; for tests and CI notebooks"),
    BasePreset("quick-gpt2", "gpt2", d_model=128, n_layers=4, n_heads=4, seq_len=128, batch_size=32, steps=250,
               n_train_docs=20_000, note="the main job's base (under two minutes)"),
    BasePreset("tiny-gpt2", "gpt2", d_model=128, n_layers=4, n_heads=4, seq_len=128, batch_size=32, steps=1200,
               note="the CPU experiment base (minutes)"),
    BasePreset("tiny-mamba2", "mamba2", d_model=128, n_layers=4, n_heads=4, seq_len=128, batch_size=32,
               steps=800, note="the CPU experiment base (minutes)"),
    # in-context lookup emerges in this recipe between 2,000 and 3,200 steps (greedy first dereference on held-out
    # 1-hop RLF problems: 0.18 at 800, 0.37 at 2,000, 0.77 at 3,200, 0.74 at 4,000; a query-blind guess 0.32):
    # the paper-shaped RLF loop starts from the whole base pass and needs it
    BasePreset("tiny-mamba2-recall", "mamba2", d_model=128, n_layers=4, n_heads=4, seq_len=128, batch_size=32,
               steps=4000, note="tiny-mamba2 trained 5x longer, until it answers in-context lookups (~30 min)"),
]}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Base:
    """A frozen, eval-mode causal LM and the handles every mechanism needs."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    arch: str
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        spec = ARCHITECTURES[self.arch]
        self.blocks = _get(self.model, spec["blocks"])
        self.final_norm = _get(self.model, spec["final_norm"])
        self.embed = _get(self.model, spec["embed"])
        self.unembed = self.model.get_output_embeddings()
        self.hidden_layout = spec["hidden_layout"]
        self.d_model = int(self.embed.weight.shape[1])
        self.n_layers = len(self.blocks)
        self.max_len = getattr(self.model.config, spec["max_len"]) if spec["max_len"] else None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the architecture fields of the config (`architecture_config`) and every weight: an artifact
        trained on this base names it. Never of a path or a name: the same weights loaded as a preset, by a
        relative path, through a symlink or from a moved LAB_HOME have the same fingerprint."""
        return _fingerprint(architecture_config(self.model.config), self.model)

    def legacy_fingerprints(self) -> frozenset[str]:
        """The fingerprint an artifact made before `fingerprint` left out paths and names records for this base as
        loaded now (the config as `to_dict()` gives it, its `_name_or_path` included), under the names it may have
        had: `lab.store.base_matches` recognises such an artifact instead of retraining it."""
        if "_legacy_fingerprints" not in self.__dict__:
            config = self.model.config.to_dict()
            names = {config.get("_name_or_path")}
            if self.path is not None:
                names |= {str(self.path), str(Path(self.path).resolve())}
            self.__dict__["_legacy_fingerprints"] = frozenset(
                _fingerprint({**config, "_name_or_path": n} if n is not None else config, self.model)
                for n in names)
        return self.__dict__["_legacy_fingerprints"]

    def has_fingerprint(self, fingerprint: str) -> bool:
        """Whether a recorded fingerprint is this base's, under the current or the legacy scheme."""
        return fingerprint == self.fingerprint or fingerprint in self.legacy_fingerprints()

    def check_length(self, n_tokens: int) -> None:
        if self.max_len is not None and n_tokens > self.max_len:
            raise LabError(f"input of {n_tokens} tokens is longer than {self.name!r}'s context of {self.max_len}")

    def encode(self, texts: str | list[str], add_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask) on the base's device; checks the context length."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) or t == "" for t in texts):
            raise LabError("expected one or more non-empty strings to encode")
        rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        if add_bos and self.tokenizer.bos_token_id is not None:
            rows = [[self.tokenizer.bos_token_id] + r for r in rows]
        longest = max(len(r) for r in rows)
        self.check_length(longest)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Unembed a residual-stream state (B, ..., d) -> (B, ..., V), applying the final norm unless `normed`.
        The state is cast to the head's dtype, as HF's own forward does (a half-precision Mamba2 base keeps
        its residual, and so its final norm's output, in float32)."""
        x = hidden if normed else self.final_norm(hidden)
        return self.unembed(x.to(self.unembed.weight.dtype))

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 30, greedy: bool = True, seed: int = 0) -> str:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise LabError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise LabError(f"seed must be a whole number >= 0, got {seed!r}")
        ids, mask = self.encode(prompt)
        self.check_length(ids.shape[1] + max_new_tokens)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=not greedy, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# config keys that name where or how a model was loaded or run, not what it computes: left out of the fingerprint
NON_ARCHITECTURE_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "torchscript", "use_return_dict",
    "architectures", "tokenizer_class", "task_specific_params", "problem_type", "finetuning_task",
    "id2label", "label2id", "chunk_size_feed_forward", "tf_legacy_loss", "pruned_heads"})


def architecture_config(config) -> dict:
    """A model config's fields that define what it computes (`NON_ARCHITECTURE_KEYS` and private keys left out)."""
    return {k: v for k, v in config.to_dict().items() if k not in NON_ARCHITECTURE_KEYS and not k.startswith("_")}


def _fingerprint(config: dict, model: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for n, t in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def preset_path(name: str) -> Path:
    return models_dir() / name


def default_device() -> torch.device:
    """Where bases load when no device is named: $LAB_DEVICE if set (e.g. "cpu", "cuda:1", "mps"), else this
    process's CUDA GPU if there is one (LOCAL_RANK under a multi-process launch), else the CPU. MPS is used
    only when named: it has no float64, which some of the lab's statistics use (they run on the CPU)."""
    name = os.environ.get("LAB_DEVICE", "").strip()
    if not name:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under `accelerate launch` / torchrun each process takes its own GPU, the one accelerate trains on
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LabError(f"LAB_DEVICE={name!r} is not a torch device; expected e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise LabError(f"LAB_DEVICE={name!r}: no {device.type} device is available on this machine")
    return device


HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MAX_NAME = 1000


def suggest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_name(key) -> str:
    if not isinstance(key, (str, Path)):
        raise LabError(f"a base is a preset name, a folder or a hub id (a string), got {type(key).__name__}")
    key = str(key)
    if not key.strip():
        raise LabError(f"a base name must not be empty. Presets: {', '.join(PRESETS)}")
    if len(key) > MAX_NAME:
        raise LabError(f"a base name or path of {len(key)} characters is too long (at most {MAX_NAME}): {key[:60]!r}...")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise LabError(f"base name {key[:80]!r} holds characters that are not valid text (lone surrogates)") from None
    if "\x00" in key:
        raise LabError(f"base name {key[:80]!r} holds a NUL character")
    return key


def _unknown(key: str, why: str = "") -> LabError:
    hint = suggest(key, PRESETS)
    return LabError(f"unknown base {key!r}{hint}: not a preset ({', '.join(PRESETS)}), not a model folder"
                    f"{why}. Hub ids (owner/name) load from the local Hugging Face cache, or are downloaded when "
                    f"downloads are allowed (set {DOWNLOADS_ENV}=1).")


def read_meta(path: Path) -> tuple[dict, str | None]:
    """A base folder's lab_base.json and None, or ({}, why) when it is unreadable or not a JSON object
    (({}, None) when there is none)."""
    meta_path = Path(path) / LAB_META
    if not meta_path.exists():
        return {}, None
    try:
        meta = read_json(meta_path)
    except (LabError, OSError) as e:
        return {}, f"skipping the metadata of {path}: {e}"
    if not isinstance(meta, dict):
        return {}, f"skipping the metadata of {path}: {meta_path} is not a JSON object"
    return meta, None


def load_base(name_or_path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Base:
    """A frozen, eval-mode Base from a preset name, a local HF model directory, or a hub id, on `device`
    (default: `default_device()`). A preset not on disk is an error; `lab.pretrain.ensure_base` trains it.

    Offline by default: a hub id loads from the local Hugging Face cache only, unless downloads are allowed
    (`lab.downloads_allowed()`, env LAB_ALLOW_DOWNLOADS=1). A name close to a preset fails at once with the
    preset suggested. The tokenizer and the weights are checked against the config: missing tokenizer files,
    special tokens that do not match, or weights missing from / unexpected for the config are errors."""
    key = _check_name(name_or_path)
    hub = False
    if key in PRESETS:
        path = preset_path(key)
        if not (path / "config.json").exists():
            raise LabError(f"base {key!r} is not on disk yet (looked in {path}). Train it with:  lab pretrain {key}")
        name = key
    else:
        try:
            path = Path(key).expanduser()
            exists = path.exists()
        except RuntimeError:  # "~user" for a user that does not exist
            raise LabError(f"no such base path {key!r}: cannot expand the home directory in it") from None
        except (OSError, ValueError) as e:  # e.g. a path component longer than the file system allows
            raise LabError(f"no such base path {key[:80]!r}: {e}") from None
        name = key
        if exists:
            if not path.is_dir() or not (path / "config.json").exists():
                raise LabError(f"{path} is not a Hugging Face model directory (no config.json). "
                               f"Expected a preset ({', '.join(PRESETS)}), a model directory, or a hub name.")
            name = path.name
        elif key.startswith((".", "/", "~")) or key.count("/") > 1:
            raise LabError(f"no such base path {key!r}. Expected a preset ({', '.join(PRESETS)}), "
                           f"a model directory, or a hub id like 'owner/name'.")
        elif not HUB_ID.match(key) or suggest(key, PRESETS):
            raise _unknown(key)  # a typo of a preset, or not a hub id at all: never ask the hub
        else:
            path, hub = key, True  # a hub id: the local cache, or the hub when downloads are allowed
    offline = not (hub and downloads_allowed())
    src = str(path)
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=offline)
    except (OSError, ValueError) as e:
        if hub:
            raise _unknown(key, f", and not in the local Hugging Face cache"
                                f"{'' if offline else ' nor on the hub'} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        raise LabError(f"could not read the config of base {key!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise LabError(f"{key!r} is a {arch!r} model; supported families are {SUPPORTED_FAMILIES}")
    if not hub and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise LabError(f"{path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}): copy the "
                       f"tokenizer the model was trained with into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=offline)
    except (OSError, ValueError, TypeError) as e:
        raise LabError(f"could not load a tokenizer for {key!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, local_files_only=offline,
                                                           output_loading_info=True)
    except Exception as e:  # safetensors/transformers raise many types for a corrupt file
        raise LabError(f"could not load the weights of {key!r} (corrupt or truncated file?): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        said = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}{', ...' if len(v) > 4 else ''}"
                         for k, v in problems.items() if v)
        raise LabError(f"the weights of {key!r} do not match its config.json ({said}): the config was edited or "
                       f"belongs to another model; restore it")
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise LabError(f"the tokenizer of {key!r} has {len(tokenizer)} tokens but the model's embedding has only "
                       f"{vocab} rows: tokenizer and model do not match")
    meta, why = read_meta(path) if not hub else ({}, None)
    if why:
        warnings.warn(why, stacklevel=2)
    if not hub and (Path(path) / LAB_META).exists():
        # the lab's own bases: the tokenizer is the one they were trained with, special tokens and all
        if len(tokenizer) != vocab:
            raise LabError(f"the tokenizer of {key!r} has {len(tokenizer)} tokens, its model {vocab}: the tokenizer "
                           f"files in {path} are not the ones it was trained with")
        for tok_name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            want, have = getattr(config, tok_name, None), getattr(tokenizer, tok_name, None)
            if want is not None and have is not None and want != have:
                raise LabError(f"the tokenizer in {path} does not match its model: {tok_name} is {have}, the model "
                               f"was trained with {want}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or default_device())
    return Base(name=name, model=_freeze(model), tokenizer=tokenizer, arch=arch,
                path=path if isinstance(path, Path) else None, meta=meta)


def list_bases() -> list[dict]:
    """Presets and what is on disk, with their held-out loss: its 95% CI over `heldout_windows` windows, and
    `vs_unigram` (loss minus the training unigram's on the same windows, CI and a paired p, its test recorded;
    None for a base trained before it was recorded: `heldout_comparison` computes it). A preset whose
    lab_base.json is unreadable is listed with a warning (`warning` in its row), never breaks the listing."""
    rows = []
    for name, p in PRESETS.items():
        folder = preset_path(name)
        meta, why = read_meta(folder)
        if why:
            warnings.warn(why, stacklevel=2)
        on_disk = bool(meta) or (why is not None and (folder / "config.json").exists())
        rows.append({"name": name, "arch": p.arch, "d_model": p.d_model, "layers": p.n_layers,
                     "on_disk": on_disk, "heldout_loss": _number(meta.get("heldout_loss")),
                     "heldout_loss_ci95": meta.get("heldout_loss_ci95"), "heldout_windows": meta.get("heldout_windows"),
                     "unigram_loss": _number(meta.get("unigram_loss")), "vs_unigram": meta.get("vs_unigram"),
                     "seconds": meta.get("seconds"), "note": p.note,
                     "warning": why})
    return rows


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def preset_base_name(preset: str, arch: str = "gpt2") -> str:
    """The lab base an experiment preset runs on: smoke -> smoke-<arch>, tiny -> tiny-<arch>, ..."""
    name = f"{preset}-{arch}"
    if name not in PRESETS:
        raise LabError(f"no lab base for preset {preset!r} and arch {arch!r}; bases are: {', '.join(PRESETS)}")
    return name
