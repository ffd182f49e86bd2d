"""Training: the adapter track (frozen base, only the injection trains), its equally-trained text arm,
and the native track (a small model pretrained with channels from layer 1 on corpus documents that carry their
generator's state as channels, against channel-less baselines: one of the same width and two bracketing its parameter
count, same data and steps). All on `lab.trainer.fit`.

    model = train_or_load(config, base)          # the channel arm's adapter, trained if missing
    controls = train_controls(config, base)      # the text arm(s), other modes and the native track, as the config asks
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config

from lab import LabError, models_dir
from lab.bases import Base
from lab.channels.config import Config
from lab.channels.data import document_channels, train_batch_items, validation_items
from lab.channels.encoders import TextEncoder
from lab.channels.injection import inject
from lab.channels.model import ChannelModel, _pack, build, target_of, threads
from lab.corpus import documents_with_state, load_tokenizer
from lab.store import Artifact, atomic_write_text, load_artifact, made_on, read_json, run_hash, save_artifact
from lab.trainer import TrainSpec, fit

KIND_ADAPTER = "channels-adapter"
KIND_TEXT = "channels-text-arm"
KIND_NATIVE = "channels-native"


def artifact_root(config: Config, base_name: str) -> Path:
    """Where this preset's adapter and text arm on `base_name` live: models/channels-<preset>-<base>."""
    return models_dir() / f"channels-{config.preset_name}-{Path(str(base_name)).name.replace('/', '_')}"


def arm_dir(config: Config, base_name: str, arm: str = "channel") -> Path:
    """One arm's artifact directory: <artifact_root>/adapter-<mode>-seed<seed>, or text-arm-seed<seed>."""
    root = artifact_root(config, base_name)
    return root / (f"adapter-{config.mode}-seed{config.seed}" if arm == "channel" else f"text-arm-seed{config.seed}")


def _alpha_log_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".alpha.json")


def train(config: Config, base, out_dir: Path | None = None, arm: str = "channel", stop_after: int | None = None,
          force: bool = False) -> Artifact:
    """Train the injection on a frozen base (arm "channel"), or the text arm. Resumable; returns the artifact."""
    out_dir = Path(out_dir) if out_dir else arm_dir(config, base.name, arm)
    kind = KIND_ADAPTER if arm == "channel" else KIND_TEXT
    if (out_dir / "manifest.json").exists() and not force:
        if not made_on(out_dir, base):  # e.g. the base was re-pretrained under the same name
            print(f"{out_dir} was trained on another base than {base.name!r} "
                  f"(fingerprint {base.fingerprint[:12]}); retraining")
        else:
            art = load_artifact(out_dir, kind, base)
            if Config.training_view(art.config, arm) == config.training_dict(arm):
                return art  # the other arm's knobs may differ
            print(f"{out_dir} was trained with another config; retraining")  # e.g. other steps or seed
    model = build(config, base, arm=arm)
    spec = TrainSpec(steps=config.steps, lr=config.arm_lr(arm),
                     warmup=min(config.warmup, config.steps // 5 or 1), seed=config.seed,
                     ckpt_every=max(50, config.steps // 5), eval_every=config.eval_every,
                     config_hash=run_hash(config.training_dict(arm), base))
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    alpha_log = _alpha_log_path(ckpt)
    history = json.loads(alpha_log.read_text()) if alpha_log.exists() and (ckpt / "trainer.json").exists() else []
    if history:  # resume: drop snapshots newer than the checkpoint (they will be recomputed identically)
        at = read_json(ckpt / "trainer.json")["step"]
        history = [h for h in history if h["step"] <= at]
    val = validation_items(config.capabilities, 4, seed=config.seed)  # training templates, its own draws
    state = {"step": 0}

    def batch_fn(step, rank, world):
        state["step"] = step + 1
        return {"items": train_batch_items(step, config.batch_size // world, config.seed, config.capabilities, rank)}

    def loss_fn(m, batch):
        return m.loss(batch["items"])

    def eval_fn(m):
        if m.injector is None:  # the text arm has no gates
            return {"val_loss": float(m.loss(val))}
        history.append({"step": state["step"], "alpha": m.injector.alpha.detach().tolist()})
        atomic_write_text(alpha_log, json.dumps(history))
        return {"val_loss": float(m.loss(val)), "max|alpha|": float(m.injector.alpha.abs().max())}

    result = fit(model, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn,
                 desc=f"channels {arm} on {base.name}", stop_after=stop_after, device=base.device)
    if stop_after is not None and stop_after < spec.steps:
        return None
    metrics = {"steps": spec.steps, "seconds": round(result.seconds, 1), "history": result.history,
               "alpha_history": history, "arm": arm, "n_params": model.adapter.n_params(),
               "text_encoder": model.text_encoder.name, "lr": spec.lr}
    if arm == "channel":
        metrics["names"] = model.injector.names
    else:  # the text arm's size, against the channel arm's it is matched to
        metrics.update(lora_rank=model.text_lora.rank, channel_arm_params=model.text_lora.target_params)
    art = save_artifact(out_dir, kind, dict(model.adapter.state_dict()), config.to_dict(), base=base, metrics=metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    alpha_log.unlink(missing_ok=True)
    return art


def load(artifact: Artifact | Path | str, base, text_encoder: TextEncoder | None = None) -> ChannelModel:
    """A ChannelModel with trained weights from an adapter or text-arm artifact (checked against `base`); its
    `.config` is the artifact's and `.artifact` the artifact itself."""
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(Path(artifact), None, base)
    if artifact.kind not in (KIND_ADAPTER, KIND_TEXT):
        raise LabError(f"{artifact.path} is a {artifact.kind!r} artifact, expected {KIND_ADAPTER} or {KIND_TEXT}")
    config = Config.from_dict(artifact.config)
    model = build(config, base, arm="channel" if artifact.kind == KIND_ADAPTER else "text", text_encoder=text_encoder)
    try:
        model.adapter.load_state_dict(artifact.tensors)
    except RuntimeError as e:
        raise LabError(f"{artifact.path} does not fit this {model.arm} arm's adapter ({str(e).splitlines()[0]})") from None
    model.eval()
    model.artifact = artifact
    return model


def train_or_load(config: Config, base, *, force: bool = False) -> ChannelModel:
    """The channel arm's adapter for `config` on `base`: trained if it is not on disk (or `force`), then loaded."""
    with threads(1):
        return load(train(config, base, force=force), base)


@dataclass
class Controls:
    """The adapter's comparison arms on disk: the equally-trained text arm of the first seed (None when the config
    trains none), the native track (one {model: artifact dir} per training seed; None when the config has none),
    the further adapter seeds as (adapter, text arm or None) pairs, and the other injection modes' adapters."""
    text: Artifact | None = None
    native: list[dict[str, Path]] | None = None
    seeds: list[tuple[Artifact, Artifact | None]] | None = None
    modes: dict[str, Artifact] | None = None


def train_controls(config: Config, base, *, force: bool = False) -> Controls:
    """The text arm (if `config.train_text_arm`), the further adapter seeds (`adapter_seeds`) with their text arms,
    the other injection modes (`compare_modes`, first seed) and the native track (if `config.native`), each trained
    if it is not on disk (or `force`)."""
    with threads(1):
        text = train(config, base, arm="text", force=force) if config.train_text_arm else None
        seeds = []
        for s in config.adapter_seed_list()[1:]:
            c = config.with_(seed=s)
            seeds.append((train(c, base, force=force), train(c, base, arm="text", force=force)
                          if config.train_text_arm else None))
        modes = {m: train(config.with_(mode=m), base, force=force) for m in config.compare_modes if m != config.mode}
        native = train_native(config, base, force=force) if config.native else None
    return Controls(text, native, seeds, modes)


# --- native track --------------------------------------------------------------------------------

def _gpt2(vocab: int, tok, d: int, layers: int, heads: int, seq: int, seed: int):
    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=max(256, 2 * seq),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def bracket_dims(target: int, vocab: int, tok, layers: int, heads: int, seq: int) -> tuple[int, int]:
    """Widths of the two channel-less baselines: the largest with fewer parameters than `target`
    and the smallest with more (multiples of `heads`)."""
    def count(d):
        c = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=max(256, 2 * seq),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        # tied head: embeddings + positions + per layer (attn 4d^2+4d, mlp 8d^2+5d, 2 LNs 4d) + final LN
        return vocab * d + c.n_positions * d + layers * (12 * d * d + 13 * d) + 2 * d
    d = heads
    while count(d + heads) < target:
        d += heads
    lo, hi = d, d + heads
    if count(lo) >= target or count(hi) <= target:
        raise LabError(f"cannot bracket {target} parameters with GPT-2 widths (got {count(lo)}, {count(hi)})")
    return lo, hi


class NativeModel(torch.nn.Module):
    """A from-scratch GPT-2 (+ channels from layer 1 when `injector` is not None), wrapped as a lab Base so
    the very same `lab.hooks` injection serves the native track."""

    def __init__(self, lm, tokenizer, config: Config, text_encoder: TextEncoder | None, with_channels: bool):
        super().__init__()
        self.lm = lm
        self.config = config
        self.__dict__["base"] = Base(name="native", model=lm, tokenizer=tokenizer, arch="gpt2")
        self.cm = None
        if with_channels:
            # a ChannelModel over the native LM: same injector, same encoders
            self.cm = ChannelModel(config, self.base, text_encoder, arm="channel")

    def _channels(self, states, zero: bool):
        return self.cm.channels(states, zero=zero) if self.cm is not None else None

    def item_losses(self, items, zero: bool = False, targets_only: bool = True) -> torch.Tensor:
        """(N,) mean next-token loss per item: of its target tokens (the response, or the one-word target, as
        `config.targets` says) given the prompt, or (targets_only=False) of the whole item text."""
        b = self.base
        ids, att, score = _pack(b.tokenizer, [it.prompt for it in items], [target_of(it, self.config) for it in items],
                                b.tokenizer.pad_token_id)
        ids, att = ids.to(b.device), att.to(b.device)
        with inject(b, self.cm.injector if self.cm else None, self._channels([it.state for it in items], zero),
                    batch=ids.shape[0]):
            logits = b.model(input_ids=ids, attention_mask=att).logits
        m = (score[:, :-1] if targets_only else att[:, 1:].bool().cpu()).to(b.device).float()
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        return (nll * m).sum(1) / m.sum(1)

    def item_loss(self, items, zero: bool = False) -> torch.Tensor:
        """LM loss on whole item texts (prompt + target): the native model learns them as text."""
        return self.item_losses(items, zero, targets_only=False).mean()

    def doc_losses(self, ids: torch.Tensor, att: torch.Tensor, states, zero: bool = False) -> torch.Tensor:
        """(N,) mean next-token loss per document window (ids, att: (N, T) right-padded), each document's generator
        state in the channels (`data.document_channels`; a document with none: every channel zero)."""
        b = self.base
        ids, att = ids.to(b.device), att.to(b.device)
        with inject(b, self.cm.injector if self.cm else None, self._channels(states, zero), batch=ids.shape[0]):
            logits = b.model(input_ids=ids[:, :-1], attention_mask=att[:, :-1]).logits
        m = att[:, 1:].float()
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        return (nll * m).sum(1) / m.sum(1)

    def text_loss(self, ids: torch.Tensor, att: torch.Tensor, states) -> torch.Tensor:
        """Mean next-token loss over a batch of documents, channels carrying each document's state."""
        b = self.base
        ids, att = ids.to(b.device), att.to(b.device)
        with inject(b, self.cm.injector if self.cm else None, self._channels(states, False), batch=ids.shape[0]):
            logits = b.model(input_ids=ids[:, :-1], attention_mask=att[:, :-1]).logits
        m = att[:, 1:].bool()
        return F.cross_entropy(logits[m].float(), ids[:, 1:][m])


# the channel model, its width-matched channel-less baseline (d = native_d: what the channels add, at equal width),
# and the two channel-less baselines bracketing its parameter count (what the injector's parameters would buy as width)
NATIVE_MODELS = ("channels", "baseline-width", "baseline-small", "baseline-large")


def native_seeds(config: Config) -> list[int]:
    """The native track's training seeds: config.seed, config.seed + 1, ... (`native_seeds` of them)."""
    return [config.seed + k for k in range(config.native_seeds)]


def native_run_dirs(config: Config, root: Path | None = None) -> list[dict[str, Path]]:
    """Where each training seed's native models live, one {model: dir} per seed in `native_seeds` order:
    <root>/channels-native-<preset>-seed<s>/<model>, root the models directory by default (two levels deep, where
    the dashboard lists artifacts)."""
    root = Path(root) if root else models_dir()
    return [{name: root / f"channels-native-{config.preset_name}-seed{s}" / name for name in NATIVE_MODELS}
            for s in native_seeds(config)]


def document_batch(tok, docs: list[tuple[str, dict | None]], seq: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Documents as right-padded windows of at most seq + 1 tokens (each from its start, ending in EOS when it fits),
    their masks, and each document's channel values (`data.document_channels`: a state that does not parse is a
    LabError)."""
    states = [document_channels(st) for _, st in docs]
    rows = [(tok.encode(t, add_special_tokens=False) + [tok.eos_token_id])[: seq + 1] for t, _ in docs]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    return ids, att, states


def heldout_state_documents(config: Config, n: int) -> list[tuple[str, dict]]:
    """n held-out corpus documents that carry a generator state (narrative, dialog), none of them a training one."""
    out, k = [], 2 * n
    while len(out) < n:
        out = [d for d in documents_with_state("heldout", k, seed=4321, guard_docs=config.native_docs) if d[1]][:n]
        k *= 2
    return out


def train_native(config: Config, text_base, out_root: Path | None = None, force: bool = False) -> list[dict[str, Path]]:
    """Pretrain four small GPT-2s on the same data and steps: "channels" (channels from layer 1, every corpus
    document's generator state in them, zero for documents without one), "baseline-width" (no channels, the same
    width), "baseline-small" and "baseline-large" (no channels, bracketing the channel model's parameter count); once
    per training seed (`native_seeds`: each seed its own initialisation and data order, shared by its models).
    The text channels use `text_base`'s mean-pooled embeddings (a fixed encoder, as the published work
    used a fixed sentence encoder). Returns one {model: artifact dir} per seed (`native_run_dirs`; `out_root` is
    the directory that holds the channels-native-<preset>-seed<s> directories, the models directory by default)."""
    tok = load_tokenizer()
    vocab = len(tok)
    te = TextEncoder(text_base, config.text_encoder, config.text_layer)
    docs = documents_with_state("train", config.native_docs, seed=4321)
    for _, st in docs:  # every state parses, before any training starts
        document_channels(st)
    probe = NativeModel(_gpt2(vocab, tok, config.native_d, config.native_layers, config.native_heads,
                              config.native_seq, config.seed), tok, config, te, True)
    target = _n_params(probe)
    lo, hi = bracket_dims(target, vocab, tok, config.native_layers, config.native_heads, config.native_seq)
    plan = {"channels": (config.native_d, True), "baseline-width": (config.native_d, False),
            "baseline-small": (lo, False), "baseline-large": (hi, False)}
    runs = native_run_dirs(config, out_root)
    for seed, run in zip(native_seeds(config), runs):
        run_config = config.with_(seed=seed)
        for name, (d, with_ch) in plan.items():
            path = run[name]
            cfg = {**run_config.to_dict(), "native_name": name,
                   "native_width": d, "with_channels": with_ch, "text_base": text_base.name,
                   "text_base_fingerprint": text_base.fingerprint}
            if (path / "manifest.json").exists() and not force and _same_native_run(load_artifact(path, KIND_NATIVE).config,
                                                                                  cfg, text_base):
                continue
            _train_native_model(run_config, path, cfg, name, d, with_ch, te, docs, tok, text_base.device)
    return runs


def _same_native_run(saved: dict, cfg: dict, text_base) -> bool:
    """Whether a saved native model is this run's: the same native settings, its text channels embedded by this base
    (by fingerprint, under either scheme, so a base moved or re-fingerprinted does not retrain it)."""
    fp = "text_base_fingerprint"
    same_settings = Config.native_view({k: v for k, v in saved.items() if k != fp}) == \
        Config.native_view({k: v for k, v in cfg.items() if k != fp})
    return same_settings and (saved.get(fp) is None or text_base.has_fingerprint(saved[fp]))


def _train_native_model(config: Config, path: Path, cfg: dict, name: str, d: int, with_ch: bool, te, docs,
                        tok, device) -> None:
    """One native model of one seed (config.seed): trained, then saved to `path` (checkpoints beside it: resumable)."""
    model = NativeModel(_gpt2(len(tok), tok, d, config.native_layers, config.native_heads, config.native_seq,
                              config.seed), tok, config, te if with_ch else None, with_ch)
    model.requires_grad_(True)
    spec = TrainSpec(steps=config.native_steps, lr=config.native_lr, warmup=min(100, config.native_steps // 10 or 1),
                     seed=config.seed, ckpt_every=max(50, config.native_steps // 5),
                     eval_every=max(10, config.native_steps // 5))
    S, Bw = config.native_seq, config.native_batch

    def batch_fn(step, rank, world):
        # identical for the seed's models: a pure function of (seed, step)
        rng = np.random.default_rng([config.seed, step, rank, 7])
        ids, att, states = document_batch(tok, [docs[i] for i in rng.integers(0, len(docs), size=Bw)], S)
        return {"ids": ids, "att": att, "states": states,
                "items": train_batch_items(step, Bw, config.seed + 1, config.capabilities, rank)}

    def loss_fn(m, batch):
        return m.text_loss(batch["ids"], batch["att"], batch["states"]) + m.item_loss(batch["items"])

    ckpt = path.with_name(f".{path.name}.ckpt")
    res = fit(model, batch_fn, loss_fn, spec, ckpt_dir=ckpt, desc=f"native {name} (d={d}, seed {config.seed})",
              device=device)  # where the text encoder runs
    metrics = {"n_params": _n_params(model), "seconds": round(res.seconds, 1), "history": res.history,
               "alpha": model.cm.injector.alpha.tolist() if with_ch else None}
    # the head is tied to the embedding: save it once (safetensors refuses shared storage)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("lm_head.weight")}
    save_artifact(path, KIND_NATIVE, tensors, cfg, base=None, metrics=metrics)
    shutil.rmtree(ckpt, ignore_errors=True)


def load_native(path: Path, text_base) -> NativeModel:
    """A trained native model (its `.config` the model's own settings, `.meta` its training metrics); its text
    channels, if any, are embedded by `text_base`, which must be the base it was trained with."""
    art = load_artifact(Path(path), KIND_NATIVE)
    cfg = art.config
    if cfg.get("text_base_fingerprint") is not None and not text_base.has_fingerprint(cfg["text_base_fingerprint"]):
        raise LabError(f"{path} was trained with text channels embedded by base {cfg.get('text_base')!r}, "
                       f"but the text encoder given is {text_base.name!r}")
    config = Config.from_dict(cfg)
    tok = load_tokenizer()
    te = TextEncoder(text_base, config.text_encoder, config.text_layer) if cfg["with_channels"] else None
    model = NativeModel(_gpt2(len(tok), tok, cfg["native_width"], config.native_layers, config.native_heads,
                              config.native_seq, config.seed), tok, config, te, cfg["with_channels"])
    try:
        model.load_state_dict(art.tensors, strict=False)
    except RuntimeError as e:
        raise LabError(f"{path} does not fit a native model of width {cfg['native_width']}: {str(e).splitlines()[0]}") from None
    missing = set(model.state_dict()) - set(art.tensors)
    # tied weights may be saved once; anything else missing is a real mismatch
    if any(not k.endswith("lm_head.weight") for k in missing):
        raise LabError(f"{path} lacks tensors {sorted(missing)[:3]}...")
    model.requires_grad_(False)
    model.eval()
    model.meta = art.manifest.get("metrics", {})
    model.config = config  # its own settings (training seed, window length, corpus size), not the adapter's
    return model
