"""`ChannelModel`: a base + a `ChannelInjector` + the channel encoders, with the three things
every experiment needs from it: the training loss, continuation log-likelihoods, and greedy generation,
each with the channels on, zeroed, or replaced by text.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Sequence

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lab import LabError
from lab.channels.config import ARMS, Config
from lab.channels.data import Item
from lab.channels.encoders import ChannelState, TextEncoder, channel_widths, encode_states
from lab.channels.injection import ChannelInjector, inject


@contextlib.contextmanager
def threads(n: int | None):
    """Run with n intra-op threads: tiny models gain nothing from more, and on a shared 2-core box
    thread oversubscription made a smoke step ~40x slower."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pack(tokenizer, prompts: Sequence[str], conts: Sequence[str], pad_id: int):
    """Right-padded ids (N, T), attention mask, and a (N, T) mask of positions whose NEXT token is a
    continuation token (so logits[:, t] is scored against ids[:, t+1])."""
    rows, plen = [], []
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


def target_of(item: Item, config: Config) -> str:
    """An item's training continuation under `config.targets`: its templated response, or its one-word target."""
    if config.targets == "word" or not item.response:
        return item.target
    return item.response


def lora_sites(model: nn.Module) -> tuple[list[str], int, bool]:
    """Where the text arm's LoRA goes: every linear map of the base (`nn.Linear`, and GPT-2's `Conv1D`) except
    the output head and a Mamba block's out_proj. Returns (module names, LoRA parameters per unit of rank = the
    sum of in + out features, and whether the maps store their weight transposed as Conv1D does: peft's
    `fan_in_fan_out`)."""
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
    how the base reads its prompt (a per-layer bias cannot read the state at all). LoRA's B starts at zero, so at init the copy computes exactly what the base does.

    The copy, not the base: peft edits the modules it wraps, and the base is shared (with the channel arm,
    and across the dashboard's sessions). Only the LoRA weights are this module's parameters (and saved)."""

    def __init__(self, base, target_params: int, seed: int = 0):
        super().__init__()
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
        self.artifact = None  # the trained weights' artifact, once `train.load` has loaded them
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

    def target_of(self, item: Item) -> str:
        """What this model is trained to say after the prompt: the item's response, or its one-word target
        (`Config.targets`)."""
        return target_of(item, self.config)

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
        ids, att, score = _pack(b.tokenizer, [self.prompt_of(it) for it in items], [self.target_of(it) for it in items],
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
