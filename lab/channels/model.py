"""Config, and `ChannelModel`: a base + a `ChannelInjector` + the channel encoders, with the three things
every experiment needs from it: the training loss, continuation log-likelihoods, and greedy generation,
each with the channels on, zeroed, or replaced by text.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lab import LabError
from lab.channels.data import CAPABILITIES, Item
from lab.channels.encoders import ChannelState, TextEncoder, channel_widths, encode_states
from lab.channels.injection import MODES, ChannelInjector, inject
from lab.configcheck import check_field_types

ARMS = ("channel", "text")


@dataclass
class Config:
    """Everything that defines a channels experiment (saved as config.json beside each artifact)."""
    base: str = "tiny-gpt2"          # the frozen base of the adapter track (a preset, HF dir or hub name)
    mode: str = "additive"           # "additive" (gated projection) or "xattn" (multi-token cross-attention)
    site: str = "resid_pre"          # where the channels enter each block
    n_tokens: int = 4                # xattn: key/value tokens per channel
    n_heads: int = 4                 # xattn: attention heads
    text_encoder: str = "base"       # "base" (mean-pooled hidden state) or "st:<sentence-transformers model>"
    text_layer: int | str = "embed"  # base encoder: "embed" (centred input embeddings), or an int resid_pre (encoders.py)
    proj_lr_ratio: float = 0.1       # projections learn at this fraction of the gates' rate (reparametrised)
    text_init: str = "identity"      # text channels' projection at init: "identity" (base encoder, additive) or "random"
    capabilities: tuple = CAPABILITIES
    # adapter training
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 50
    seed: int = 0
    eval_every: int = 100            # steps between alpha snapshots / held-out loss on the progress bar
    train_text_arm: bool = True      # also train the equally-trained text arm (channel-vs-text experiment)
    # the text arm's LoRA lr (same steps, batches and schedule as the injector): session 15 trained it on tiny-gpt2 at 5e-4,
    # 1e-3 and 2e-3 for the full 1,200 steps; mean validation loss of the last four evaluations 1.884 / 1.792 / 1.860 on the
    # 36 validation items of train.py (held-out pools, seed + 99: the test set's pools, so the choice, like the
    # injector's in the tiny preset, saw held-out wording)
    text_lr: float = 1e-3
    # evaluation
    n_heldout: int = 240             # held-out items per selection capability / prompt pairs per register one
    gen_tokens: int = 8              # greedy tokens per generation
    n_attribution: int = 24          # held-out items per capability for captum attributions
    # native track: a small GPT-2 trained from scratch with channels from layer 1, vs 2 channel-less baselines
    native: bool = True
    native_d: int = 128
    native_layers: int = 4
    native_heads: int = 4
    native_steps: int = 800
    native_seq: int = 96             # corpus window length
    native_batch: int = 16           # corpus windows per step (plus as many channel items)
    native_lr: float = 2e-3
    native_docs: int = 20_000        # lab-corpus training documents
    # independent training runs of the three native models (seeds seed, seed+1, ...): whether training with channels
    # helps is a question about training runs, so the report's test of it is across these, not across windows
    native_seeds: int = 1
    preset_name: str = "custom"

    def __post_init__(self):
        check_field_types(self)
        if self.text_init not in ("identity", "random"):
            raise LabError(f"text_init must be 'identity' or 'random', got {self.text_init!r}")
        if self.mode not in MODES:
            raise LabError(f"mode must be one of {MODES}, got {self.mode!r}")
        bad = [c for c in self.capabilities if c not in CAPABILITIES]
        if bad or not self.capabilities:
            raise LabError(f"unknown capabilities {bad}; expected a non-empty subset of {CAPABILITIES}")
        self.capabilities = tuple(self.capabilities)
        for k in ("steps", "batch_size", "n_heldout", "gen_tokens", "native_steps", "native_d", "native_layers",
                  "native_batch", "native_seq", "native_seeds"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LabError(f"{k} must be a positive int, got {v!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        presets = {
            # seconds: tests and CI notebooks, on smoke-gpt2
            "smoke": dict(base="smoke-gpt2", steps=30, batch_size=16, eval_every=10, n_heldout=12, gen_tokens=4,
                          n_attribution=3, native_d=32, native_layers=2, native_steps=12, native_seq=32,
                          native_batch=8, native_docs=1000, native_seeds=2),
            # the CPU experiment: minutes on tiny-gpt2. Both arms' learning rates are picked the same way (session 15,
            # full 1,200-step runs, mean validation loss of the last four evaluations): the injector's gates at
            # 3e-3 / 1e-2 / 3e-2 / 6e-2 / 0.12 / 0.25: 3.071 / 2.734 / 2.341 / 2.118 / 2.013 / 2.185
            # (tiny-mamba2 picks its own, TUNED_LRS; both redone by `python bench/bench_channels.py --lr-sweep`)
            # three native training seeds: session 16's one native run gave the zeroed model 0.004 nats *worse* than a
            # baseline, session 11's (older code) put it between the two; one run cannot tell such a gap from seed noise
            "tiny": dict(base="tiny-gpt2", lr=0.12, native_seeds=3),
            # a GPU and a real HF base with a real sentence encoder (as published: BGE-M3)
            "paper": dict(base="gpt2", text_encoder="st:BAAI/bge-m3", steps=20_000, batch_size=64, lr=1e-3,
                          n_heldout=500, gen_tokens=24, native_d=768, native_layers=12, native_heads=12,
                          native_steps=50_000, native_seq=512, native_batch=32, native_docs=2_000_000),
        }
        if name not in presets:
            raise LabError(f"unknown preset {name!r}; expected one of {list(presets)}")
        known = {f.name for f in fields(cls)}
        bad = [k for k in overrides if k not in known]
        if bad:
            raise LabError(f"unknown config field(s) {bad}")
        base = overrides.get("base", presets[name].get("base"))
        tuned = cls.TUNED_LRS.get((name, base), {})  # a base's own learning rates; explicit overrides still win
        return cls(**{**presets[name], **tuned, **overrides, "preset_name": name})

    # Learning rates picked per (preset, base), both arms the same way as the tiny preset's (full 1,200-step runs, mean
    # validation loss of the last four evaluations; session 16, `python bench/bench_channels.py --lr-sweep`, one run at a time).
    # tiny-mamba2: the gates at 1e-2 / 3e-2 / 6e-2 / 0.12: 2.812 / 2.704 / 2.642 / 2.832; the text arm's LoRA at
    # 3e-5 / 1e-4 / 3e-4 / 1e-3: 2.692 / 2.602 / 2.792 / 2.870. At tiny-gpt2's rates both arms' validation loss rose
    # after step 200 on this base. The same caveat as above: the validation items come from the held-out pools.
    TUNED_LRS = {("tiny", "tiny-mamba2"): dict(lr=6e-2, text_lr=1e-4)}

    FORMAT = 4  # bump when an arm's adapter layout or the encoder changes: stale artifacts are then retrained

    # the other arm's training knobs: changing the text arm's lr must not retrain the injector, nor the reverse.
    # (Evaluation settings stay in: `evaluate` reads them from the artifact's config.)
    _OTHER_ARM = {"channel": ("text_lr",), "text": ("lr", "proj_lr_ratio", "text_init")}

    def training_dict(self, arm: str) -> dict:
        """`to_dict` without the other arm's or the native track's training knobs: what decides whether an artifact on disk is this
        arm's, and what keys its checkpoints."""
        return self.training_view(self.to_dict(), arm)

    @classmethod
    def training_view(cls, saved: dict, arm: str) -> dict:
        """The same restriction of a saved config dict (its format kept, so a stale layout still differs)."""
        if arm not in ARMS:
            raise LabError(f"arm must be one of {ARMS}, got {arm!r}")
        drop = set(cls._OTHER_ARM[arm])
        # the native track's knobs and whether a text arm is trained at all shape neither arm's training: adding native
        # seeds, or `lab reproduce` (no text arm, no native track on tiny-mamba2), must not retrain an adapter
        drop |= {f.name for f in fields(cls) if f.name.startswith("native")} | {"train_text_arm"}
        return {k: v for k, v in saved.items() if k not in drop}

    # what the native track's three models do not depend on: the adapter arms' training and evaluation knobs, and how
    # many native seeds there are (a property of the track, not of one run)
    _NOT_NATIVE = ("steps", "batch_size", "lr", "warmup", "eval_every", "train_text_arm", "text_lr", "n_heldout",
                   "gen_tokens", "n_attribution", "native", "native_seeds")

    @classmethod
    def native_view(cls, saved: dict) -> dict:
        """A saved config dict without `_NOT_NATIVE`: what decides whether a native model on disk is this run's
        (another adapter lr or step count must not retrain three seeds of three models)."""
        return {k: v for k, v in saved.items() if k not in cls._NOT_NATIVE}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capabilities"] = list(self.capabilities)
        d["format"] = self.FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "capabilities" else v) for k, v in d.items() if k in known})


def _pack(tokenizer, prompts: Sequence[str], conts: Sequence[str], pad_id: int):
    """Right-padded ids (N, T), attention mask, and a (N, T) mask of positions whose NEXT token is a
    continuation token (so logits[:, t] is scored against ids[:, t+1])."""
    rows, tmask, plen = [], [], []
    for p, c in zip(prompts, conts):
        pi = tokenizer.encode(p, add_special_tokens=False)
        ci = tokenizer.encode(c, add_special_tokens=False)
        if not pi or not ci:
            raise LabError(f"empty prompt or continuation: {p!r} / {c!r}")
        rows.append(pi + ci)
        plen.append(len(pi))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    score = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        score[i, plen[i] - 1: len(r) - 1] = True
    return ids, att, score


def lora_sites(model: nn.Module) -> tuple[list[str], int, bool]:
    """Where the text arm's LoRA goes: every linear map of the base (`nn.Linear`, and GPT-2's `Conv1D`) except
    the output head and a Mamba block's out_proj. Returns (module names, LoRA parameters per unit of rank = the
    sum of in + out features, and whether the maps store their weight transposed as Conv1D does: peft's
    `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Mamba's fused CUDA kernels read out_proj's weight directly, past any LoRA wrapper (peft refuses it there)
    mamba = "mamba" in str(getattr(getattr(model, "config", None), "model_type", ""))
    names, per_rank, transposed = [], 0, False
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if mamba and name.rsplit(".", 1)[-1] == "out_proj":
            continue
        if isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            transposed = True
        else:
            fan_in, fan_out = module.in_features, module.out_features
        names.append(name)
        per_rank += fan_in + fan_out
    if not names:
        raise LabError(f"found no linear maps for the text arm's LoRA in {type(model).__name__}")
    return names, per_rank, transposed


class TextArmLoRA(nn.Module):
    """The text arm's trainable part: LoRA (peft) on every linear map of a private copy of the base, of the
    rank that gives it as many trainable parameters as the channel arm's injector (`ChannelInjector.param_count`).
    Why LoRA: the text arm must be an equally trained *and equally sized* model whose trainable part can change
    how the base reads its prompt; a per-layer bias (what this arm had until session 15) cannot read the state
    at all. LoRA's B starts at zero, so at init the copy computes exactly what the base does.

    The copy, not the base: peft edits the modules it wraps, and the base is shared (with the channel arm,
    and across the dashboard's sessions). Only the LoRA weights are this module's parameters (and saved)."""

    def __init__(self, base, target_params: int, seed: int = 0):
        super().__init__()
        import peft

        lm = copy.deepcopy(base.model)
        for p in lm.parameters():
            p.requires_grad_(False)
        names, per_rank, transposed = lora_sites(lm)
        self.rank = max(1, round(target_params / per_rank))
        cfg = peft.LoraConfig(r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, bias="none",
                              target_modules=names, fan_in_fan_out=transposed)
        # LoRA's A init draws from the global generator of the copy's device; manual_seed reseeds every device's,
        # so every one is forked and restored: building a text arm leaves the caller's random state as it was
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            torch.manual_seed(seed)
            # peft still calls transformers' deprecated is_gradient_checkpointing: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            lm = peft.get_peft_model(lm, cfg)
        self.__dict__["lm"] = lm  # not a submodule: the frozen copy is the base's weights, never saved
        # the LoRA matrices themselves (shared Parameter objects): these train, checkpoint and save
        self.weights = nn.ParameterDict({n.replace(".", "__"): p for n, p in lm.named_parameters() if p.requires_grad})
        self.target_params = int(target_params)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.weights.values())


class ChannelModel(nn.Module):
    """A frozen base with channels. Only `adapter` has parameters (the base is not a submodule, so
    checkpoints and artifacts hold the adapter alone).

    arm "channel": the state goes in through the six channels; `adapter` is the `ChannelInjector` (`injector`).
    arm "text":    the state is written into the prompt (item.text_state) and there are no channels; `adapter`
                   is a `TextArmLoRA` with as many trainable parameters as the channel arm's injector, trained
                   on the same batches for the same steps: "an equally trained model".
    """

    def __init__(self, config: Config, base, text_encoder: TextEncoder | None = None, arm: str = "channel"):
        super().__init__()
        if arm not in ARMS:
            raise LabError(f"arm must be one of {ARMS}, got {arm!r}")
        self.config, self.arm = config, arm
        self.__dict__["base"] = base  # not a submodule: the base is frozen and not saved with the adapter
        self.text_encoder = text_encoder or TextEncoder(base, config.text_encoder, config.text_layer)
        widths = channel_widths(self.text_encoder.dim)
        if arm == "text":
            self.injector = None
            self.text_lora = TextArmLoRA(base, ChannelInjector.param_count(
                base.d_model, base.n_layers, widths, config.mode, config.n_tokens), seed=config.seed)
            self.text_lora.lm.to(base.device)
            return
        self.injector = ChannelInjector(base.d_model, base.n_layers, widths, config.mode,
                                        config.n_tokens, config.n_heads, config.proj_lr_ratio)
        ident = ()
        if (config.mode == "additive" and config.text_init == "identity"
                and config.text_encoder == "base" and self.text_encoder.dim == base.d_model):
            ident = ("memory", "identity", "continuity")
        self.injector.init_weights(seed=config.seed, identity=ident)
        self.injector.to(base.device)  # float32 beside any base dtype: the gates are what trains

    @property
    def adapter(self) -> nn.Module:
        """The trainable part: the channel injector, or the text arm's LoRA."""
        return self.injector if self.arm == "channel" else self.text_lora

    @property
    def lm(self) -> nn.Module:
        """The language model this arm runs: the base's own (channels enter through hooks), or the text arm's
        LoRA-wrapped copy of it."""
        return self.base.model if self.arm == "channel" else self.text_lora.lm

    # --- channel tensors -----------------------------------------------------------------------

    def channels(self, states: Sequence[ChannelState | dict], zero: bool | Sequence[str] = False) -> dict:
        """{name: (B, width)} for a batch of states; `zero` = True (all) or channel names to zero.
        The text arm has no channels: None (no injection)."""
        if self.arm == "text":
            return None
        x = encode_states(states, self.text_encoder)
        if zero is True:
            return {k: torch.zeros_like(v) for k, v in x.items()}
        for k in (zero or ()):
            if k not in x:
                raise LabError(f"cannot zero unknown channel {k!r}; channels are {list(x)}")
            x[k] = torch.zeros_like(x[k])
        return x

    def prompt_of(self, item: Item, with_text: bool | None = None, trained_frame: bool = False) -> str:
        """The prompt an arm sees: the text arm prepends the state as text (trained_frame: worded in a training
        frame, the control for state wording the text arm has not seen)."""
        with_text = (self.arm == "text") if with_text is None else with_text
        if not with_text:
            return item.prompt
        return (item.text_state_trained_frame if trained_frame else item.text_state) + item.prompt

    # --- scoring -------------------------------------------------------------------------------

    def continuation_logprobs(self, prompts: Sequence[str], conts: Sequence[str], channels: dict | None,
                              batch: int = 64) -> torch.Tensor:
        """(N,) summed log p(continuation | prompt) with the channels on (None: the bare base)."""
        b = self.base
        out = []
        for i in range(0, len(prompts), batch):
            sl = slice(i, i + batch)
            ids, att, score = _pack(b.tokenizer, prompts[sl], conts[sl], b.tokenizer.pad_token_id)
            b.check_length(ids.shape[1])
            ch = None if channels is None else {k: v[sl] for k, v in channels.items()}
            with inject(b, self.injector, ch, batch=ids.shape[0], site=self.config.site):
                logits = self.lm(input_ids=ids.to(b.device), attention_mask=att.to(b.device)).logits.float()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None].to(b.device))[..., 0]  # (B, T-1)
            out.append((lp * score[:, :-1].to(lp.device)).sum(1).cpu())
        return torch.cat(out)

    def loss(self, items: Sequence[Item]) -> torch.Tensor:
        """Mean cross-entropy of the target continuation tokens, state through this arm."""
        b = self.base
        ids, att, score = _pack(b.tokenizer, [self.prompt_of(it) for it in items], [it.target for it in items],
                                b.tokenizer.pad_token_id)
        b.check_length(ids.shape[1])
        ch = self.channels([it.state for it in items])
        with inject(b, self.injector, ch, batch=ids.shape[0], site=self.config.site):
            logits = self.lm(input_ids=ids.to(b.device), attention_mask=att.to(b.device)).logits  # (B, T, V)
        tgt = ids[:, 1:].to(b.device)
        m = score[:, :-1].to(b.device)
        return F.cross_entropy(logits[:, :-1][m].float(), tgt[m])

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], channels: dict | None, max_new_tokens: int = 8,
                 batch: int = 64, early_exit: bool = True) -> list[str]:
        """Greedy continuations, batched with right padding (each row reads its own last position;
        causal models never look at the padding after it), channels on every forward.

        early_exit=False runs all `max_new_tokens` forwards even once every row has ended its text: the
        same outputs, a fixed amount of work (for timing two arms against each other)."""
        b = self.base
        tok = b.tokenizer
        outs: list[str] = []
        for i in range(0, len(prompts), batch):
            rows = [tok.encode(p, add_special_tokens=False) if isinstance(p, str) else None
                    for p in prompts[i: i + batch]]
            empty = [p for p, r in zip(prompts[i: i + batch], rows) if not r]
            if empty:  # a row with no tokens has no last position to continue from
                raise LabError(f"generate needs non-empty prompt strings, got {empty[0]!r}")
            ch = None if channels is None else {k: v[i: i + batch] for k, v in channels.items()}
            lens = torch.tensor([len(r) for r in rows])
            b.check_length(int(lens.max()) + max_new_tokens)
            T = int(lens.max()) + max_new_tokens
            ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
            gen = [[] for _ in rows]
            done = torch.zeros(len(rows), dtype=torch.bool)
            with inject(b, self.injector, ch, batch=len(rows), site=self.config.site):
                for _ in range(max_new_tokens):
                    cur = int(lens.max())
                    att = (torch.arange(cur)[None] < lens[:, None]).long()
                    logits = self.lm(input_ids=ids[:, :cur].to(b.device), attention_mask=att.to(b.device)).logits
                    nxt = logits[torch.arange(len(rows)), lens - 1].argmax(-1).cpu()  # (B,)
                    for j in range(len(rows)):
                        if not done[j]:
                            gen[j].append(int(nxt[j]))
                            done[j] = int(nxt[j]) == tok.eos_token_id
                    ids[torch.arange(len(rows)), lens] = nxt
                    lens = lens + 1
                    if early_exit and done.all():
                        break
            outs += [tok.decode(g, skip_special_tokens=True) for g in gen]
        return outs


def build(config: Config, base, arm: str = "channel", text_encoder: TextEncoder | None = None) -> ChannelModel:
    """The module(s) from config alone: a ChannelModel on `base` with zero-init gates."""
    return ChannelModel(config, base, text_encoder, arm)
