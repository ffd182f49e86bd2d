"""Recursive Latent Forcing: one looped core over a frozen base's residual stream.

    x      = base(prompt)            the final block's output *before* the final norm   (B, T, d)
    x_p    = x.detach()              the prompt copy the lifeline re-feeds
    for k in 0, 1, 2, ...:
        x = x + gate * x_p           loop.{k}.after_lifeline   (gate: float32 (d,), init 1; 0 = no lifeline)
        x = rope(x, k)               loop.{k}.after_rope       (parameter-free; identity at k = 0)
        x = upper_blocks(x)          loop.{k}.upper_out        (loop="paper" only: the base's top blocks, LoRA)
        x = x + core(x)              loop.{k}.after_core       (causal; output projection zero-initialised)
        x = RMSNorm(x)               loop.{k}.latent           (loop_norm, default on, as the published script)
        logits_k = head(final_norm(x[answer]))                 (the base's final norm + head; paper loop: a
                                                                trainable copy of the head)

The published loop, as its public training script runs it, and the options that give it here:
- per-loop RMSNorm (`loop_norm=True`, default): after the core's residual add, before the final norm and head,
  and the normalised state is what the next loop starts from (weight ones at init, trainable, undecayed).
- weight decay (`decay="matrices"`, default): the gate, biases and norm scales (every 1-d tensor) sit in a
  zero-decay AdamW group (lab.trainer.fit's `no_decay`); "lora" decays only LoRA matrices, as the Mamba2 script
  does; "all" decays every tensor.
- the Mamba2 configuration (`loop="paper"`, a Mamba2 base, `core="mamba2"`): the whole base encodes the prompt,
  then every loop re-runs the base's top blocks (`loop_blocks`, default all but the lowest quarter: layers 6-23
  of 24) with peft LoRA (rank `lora_rank`, alpha 2 x rank) on each mixer's in/out projection, then the core,
  then the loop norm, and the head is trainable.

Departures that remain, each with its reason:
- The Mamba2 core is in_proj -> one HF `Mamba2Block` -> LayerNorm -> out_proj at width `d_core` (the published
  core is a bare Mamba2 mixer at d_model): the lab's cores share one shape, and d_core = d_model is available.
  Its recurrent state is not carried across loops (as published: only the residual stream is).
- The Mamba2 core's conv width (`mamba_conv`, default 4 as published) and init (`mamba_init`, default
  "published"): the Mamba2 configurations in bench_rlf use a width of 6 and the "match" lookup prior (C = B,
  x-conv the identity), the SSM's counterpart of the transformer core's W_K = W_Q start. Why: at base_blocks=0
  the asked name sits 4 tokens before the read position, out of a width-4 conv's reach, and with the published
  init the core learns 1-hop lookups far more slowly (`python bench/bench_rlf.py --mamba-core-sweep`).
- The paper loop's tiny base is `tiny-mamba2-recall` (bench_rlf's mamba2-paper config), not tiny-mamba2. Why: the
  loop starts from the whole base pass, so the base must already look names up in context, as the published
  Pile-trained 130M base does; tiny-mamba2's first dereference (0.18 at 1 hop) is below a query-blind guess among
  the page's right-hand sides (0.32), and the recipe trained 5x longer gets 0.74 (`bench_rlf.py --base-lookup`).
- The paper loop acts on the HF block's single residual stream. mamba_ssm (the published code) threads a
  (hidden, residual) pair between blocks and its lifeline, RoPE, core and loop norm act on the last mixer's
  output while the residual sum rides along; HF's `Mamba2Block` folds the residual in, so there is no such split.
- The paper loop's head is a trainable copy, untied from the input embedding (published: the tied embedding
  trains too). Why: the frozen base must stay shared by every run and control in a process, and the prompt
  encoding the lifeline re-feeds stays the frozen base's; the embedding is still frozen here.
- One learning rate for every trainable tensor (published: LoRA 2e-4, the rest 5e-4); the published run also
  warm-started from earlier checkpoints, the lab trains from scratch.
- The loop RoPE is applied to the running state each loop (rotations compose across loops), as described.
- The transformer core (the GPT-2 configuration) has rotary embeddings over token positions inside its
  attention (`core_token_rope`) and short causal convolutions on q and k (`core_conv`), so "read the name two
  tokens back" needs no learned positions; its in_proj starts whitened on training prompts (`whiten_in_proj`).
- Answer space (`answer_space`, default "task"): the logits of tokens that are neither a variable
  name, a value word nor HALT are masked, for the loss and the argmax. Why: with the frozen tied
  head of a tiny base, full-vocabulary cross-entropy rewards pushing *all* value words above the
  rest of the vocabulary without bound; the core's output grows into that constant direction, the
  final norm shrinks every input-specific signal, and training stalls at the value marginal
  (ln 40 nats). "full" (as published: the whole vocabulary) remains available.
- Where the loop starts (`base_blocks`): -1 (default, as published) is the last block's output before the final
  norm; `base_blocks=n` starts after n blocks (0: the embedding layer); the tiny and quick presets use 0
  (lab.rlf.config says why). Then the lifeline re-feeds embeddings, whose norm is far below the RMS-normed
  state's sqrt(d): the gate has to grow for the prompt to weigh as it does on the published base.
- Hops: the lab counts dereferences; the published "k hops" is lab hops k+1 (the report places its figures
  at the matching point).

Inference-time lifeline interventions (`Lifeline`: zero, norm-matched zero, noise, shuffled positions,
another example's prompt, a global scale, RAM/ALU dimension scales, from a given loop on) act on the
lifeline term gate * x_p only; they are small JSON-serialisable specs so the notebook, app and report name
the same intervention. Every loop's states are recorded into a `lab.hooks.ActivationCache` under
`loop.{k}.{site}` when one is passed, so probes read exactly the states training produced.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Block

from lab import LabError
from lab.hooks import ActivationCache, stream_at
from lab.rlf.data import ANSWER_MARKER, Vocab, train_batch

LOOP_SITES = ("resid_pre", "lifeline", "after_lifeline", "after_rope", "core_out", "after_core", "latent")
PAPER_SITES = ("upper_out",)         # the paper loop also records the re-run blocks' output
LIFELINE_MODES = ("on", "zero", "zero_matched", "noise", "shuffle", "other")
LORA_TARGETS = ("in_proj", "out_proj")   # the published LoRA targets in each re-run Mamba2 mixer


@dataclass
class Lifeline:
    """An inference-time intervention on the lifeline term gate * x_prompt (JSON-serialisable).

    mode: "on" (as trained), "zero", "zero_matched" (zero the term, then rescale the state the core reads to the
    intact run's per-position norm at that loop: a lifeline-zero that is not also a scale shift), "noise"
    (Gaussian, per-position norm matched to the real term),
    "shuffle" (the term's positions permuted within each example, padding excluded), "other" (the
    term computed from another example of the batch: example b takes example b+1's prompt).
    scale multiplies the whole term; ram_scale / alu_scale multiply only the RAM / ALU dimensions
    (`ram_dims` / `alu_dims`, from a gate partition); from_loop leaves the loops before it as trained."""
    mode: str = "on"
    scale: float = 1.0
    ram_scale: float = 1.0
    alu_scale: float = 1.0
    ram_dims: list[int] = field(default_factory=list)
    alu_dims: list[int] = field(default_factory=list)
    seed: int = 0
    from_loop: int = 0       # the intervention acts at loops >= from_loop (1: "after the first loop"); earlier as trained

    def __post_init__(self):
        if self.mode not in LIFELINE_MODES:
            raise LabError(f"lifeline mode must be one of {LIFELINE_MODES}, got {self.mode!r}")
        for k in ("scale", "ram_scale", "alu_scale"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LabError(f"lifeline {k} must be a finite number, got {v!r}")
        if not isinstance(self.from_loop, int) or isinstance(self.from_loop, bool) or self.from_loop < 0:
            raise LabError(f"lifeline from_loop must be a whole number >= 0, got {self.from_loop!r}")
        for k in ("ram_dims", "alu_dims"):
            dims = getattr(self, k)
            if not isinstance(dims, (list, tuple)) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                                          for i in dims):
                raise LabError(f"lifeline {k} must be a list of non-negative int dimensions, got {dims!r}")
            setattr(self, k, list(dims))

    def check_width(self, d: int) -> None:
        """The RAM / ALU dimensions exist in a lifeline gate of width d."""
        for k in ("ram_dims", "alu_dims"):
            bad = [i for i in getattr(self, k) if i >= d]
            if bad:
                raise LabError(f"lifeline {k} {bad} are out of range for a gate of width {d} (0..{d - 1})")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        return (self.mode == "on" and self.scale == 1.0 and (self.ram_scale == 1.0 or not self.ram_dims)
                and (self.alu_scale == 1.0 or not self.alu_dims))


def loop_rope(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim by k * 10000^(-2i/d); identity at k = 0; no parameters."""
    if k == 0:
        return x
    d = x.shape[-1]
    half = d // 2
    theta = 10000.0 ** (-2.0 * torch.arange(half, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = k * theta
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    pairs = x[..., : 2 * half].unflatten(-1, (half, 2))                                        # (..., d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., 2 * half:]], dim=-1) if d % 2 else rot


def _token_rope(T: int, hd: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hd/2) for rotary position embeddings over *token* positions inside the core."""
    inv = 10000.0 ** (-torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _apply_token_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = t[..., 0::2], t[..., 1::2]                                   # (B, H, T, hd/2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class CoreBlock(nn.Module):
    """One pre-norm causal self-attention + MLP block (nanoGPT-style), with optional rotary embeddings
    over token positions, and optional short causal depthwise convolutions on the queries and on the
    keys (separate, as in H3 / Based; RLF.init_weights sets their taps). Why: a pointer lookup needs the key at
    " walnut" in "K = walnut." to carry "K" (two tokens back) and the query at ":" to carry the name
    asked in "What is K?" (four tokens back); with a short convolution on each, one attention layer can
    dereference, where plain attention must first discover a previous-token head (the "induction
    plateau": 1,000 steps without dereferencing in our trials). Values come from the unmixed stream."""

    def __init__(self, d: int, n_heads: int, ff_mult: int, token_rope: bool, conv: int = 0):
        super().__init__()
        self.n_heads, self.token_rope, self.conv_width = n_heads, token_rope, conv
        if conv:
            self.q_conv = nn.Conv1d(d, d, conv, groups=d, bias=False)
            self.k_conv = nn.Conv1d(d, d, conv, groups=d, bias=False)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, ff_mult * d), nn.GELU(), nn.Linear(ff_mult * d, d))

    def _short_conv_qk(self, qk: torch.Tensor) -> torch.Tensor:         # causal: (B, T, 2d) -> (B, T, 2d)
        """Both depthwise convolutions in one call, as a conv2d over a (B, 2d, 1, T) view whose memory
        is channels-last. Why: on CPU, Conv1d on (B, d, T) took 27 ms forward + backward per block and
        loop at the tiny preset's shapes (B 32, T 87, 2d 512), this 9 ms: oneDNN's depthwise kernel wants
        channels last. A whole 5-hop training step went from 0.845 to 0.778 s, the same loss and
        gradients to 1e-9. The arithmetic per channel is the same (tests/test_rlf.py)."""
        w = torch.cat([self.q_conv.weight, self.k_conv.weight]).unsqueeze(2)   # (2d, 1, 1, width)
        x = nn.functional.pad(qk, (0, 0, self.conv_width - 1, 0))              # (B, T + width - 1, 2d)
        x = x.permute(0, 2, 1).unsqueeze(2)                                    # (B, 2d, 1, T + w - 1), NHWC memory
        return nn.functional.conv2d(x, w, groups=w.shape[0]).squeeze(2).transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:                  # (B, T, d) -> (B, T, d)
        B, T, d = h.shape
        qkv = self.qkv(self.ln1(h))
        if self.conv_width:
            q, k = self._short_conv_qk(qkv[..., :2 * d]).split(d, dim=-1)
            v = qkv[..., 2 * d:]
        else:
            q, k, v = qkv.split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.token_rope:                                               # q, k: (B, H, T, hd)
            cos, sin = _token_rope(T, d // self.n_heads, h.device, h.dtype)
            q, k = _apply_token_rope(q, cos, sin), _apply_token_rope(k, cos, sin)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return h + self.mlp(self.ln2(h))


class TransformerCore(nn.Module):
    """in_proj -> n causal pre-norm Transformer blocks -> norm -> out_proj (zero init)."""

    def __init__(self, d: int, d_core: int, n_layers: int, n_heads: int, ff_mult: int, token_rope: bool = True,
                 conv: int = 0):
        super().__init__()
        if d_core % n_heads or (d_core // n_heads) % 2:
            raise LabError(f"core width {d_core} must split into {n_heads} heads of even size")
        self.in_proj = nn.Linear(d, d_core)
        self.layers = nn.ModuleList([CoreBlock(d_core, n_heads, ff_mult, token_rope, conv) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_core)
        self.out_proj = nn.Linear(d_core, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, d) -> (B, T, d)
        h = self.in_proj(x)                                 # (B, T, d_core)
        for layer in self.layers:
            h = layer(h)
        return self.out_proj(self.norm(h))


class Mamba2Core(nn.Module):
    """in_proj -> one Mamba2 block (RMSNorm + Mamba2 mixer, fresh state every call) -> out_proj (zero init)."""

    def __init__(self, d: int, d_core: int, d_state: int, expand: int, head_dim: int, conv: int = 4):
        super().__init__()
        head_dim = min(head_dim, expand * d_core)
        if (expand * d_core) % head_dim:
            raise LabError(f"Mamba2 core: expand*d_core = {expand * d_core} is not divisible by head_dim {head_dim}")
        cfg = Mamba2Config(hidden_size=d_core, num_hidden_layers=1, state_size=d_state, expand=expand,
                           head_dim=head_dim, num_heads=expand * d_core // head_dim, n_groups=1, chunk_size=64,
                           conv_kernel=conv, residual_in_fp32=True, vocab_size=8)
        self.in_proj = nn.Linear(d, d_core)
        self.block = Mamba2Block(cfg, layer_idx=0)
        self._init_ssm(cfg)
        self.norm = nn.LayerNorm(d_core)
        self.out_proj = nn.Linear(d_core, d)

    @torch.no_grad()
    def _init_ssm(self, cfg) -> None:
        """transformers leaves A_log, D and dt_bias as torch.empty outside from_pretrained (its init hook
        did not run here): set the standard Mamba2 init explicitly (A = 1..H, D = 1, dt ~ logU[1e-3, 1e-1])."""
        mx = self.block.mixer
        H = mx.num_heads
        mx.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        mx.D.fill_(1.0)
        dt = torch.exp(torch.rand(H) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                       + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
        mx.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus

    @torch.no_grad()
    def match_init(self) -> None:
        """The lookup prior the transformer core's W_K = W_Q gives, in SSM terms: C (what a position reads the
        state with) starts equal to B (what a position writes under), both their convolutions start as the mean of
        the last few positions, and the value written (x) is the position's own token: a position whose recent
        tokens match a key's reads that key's value."""
        mx = self.block.mixer
        inner, n = mx.intermediate_size, mx.n_groups * mx.ssm_state_size
        b_rows = slice(2 * inner, 2 * inner + n)            # in_proj rows: gate z | x | B | C | dt
        c_rows = slice(2 * inner + n, 2 * inner + 2 * n)
        mx.in_proj.weight[c_rows] = mx.in_proj.weight[b_rows]
        if mx.in_proj.bias is not None:
            mx.in_proj.bias[c_rows] = mx.in_proj.bias[b_rows]
        mx.conv1d.weight.zero_()                            # conv channels: x | B | C
        mx.conv1d.weight[:inner, 0, -1] = 1.0               # x (the value written) is the position's own token
        mx.conv1d.weight[inner:inner + 2 * n] = 1.0 / mx.conv_kernel_size
        if mx.conv1d.bias is not None:
            mx.conv1d.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, d) -> (B, T, d)
        h = self.block(self.in_proj(x))                     # (B, T, d_core); cache_params=None: no carried state
        return self.out_proj(self.norm(h))


class RLF(nn.Module):
    """The looped core on a frozen base (the base is held, not registered: only gate + core train)."""

    def __init__(self, config, base):
        super().__init__()
        self.config = config
        object.__setattr__(self, "base", base)  # not a submodule: never trained, never checkpointed
        self.vocab = Vocab(base.tokenizer)
        d = base.d_model
        d_core = config.d_core or d
        if config.loop == "paper" and base.arch != "mamba2":
            raise LabError(f"loop='paper' re-runs Mamba2 blocks (the published Mamba2 configuration); "
                           f"{base.name!r} is a {base.arch} base: use loop='standard'")
        if config.lifeline:
            self.gate = nn.Parameter(torch.full((d,), float(config.gate_init), dtype=torch.float32))
        else:  # the no-lifeline baseline: gate fixed at 0
            self.register_buffer("gate", torch.zeros(d, dtype=torch.float32))
        if config.core == "transformer":
            self.core = TransformerCore(d, d_core, config.core_layers, config.n_heads, config.ff_mult,
                                        config.core_token_rope, config.core_conv)
        elif config.core == "mamba2":
            self.core = Mamba2Core(d, d_core, config.mamba_d_state, config.mamba_expand, config.mamba_head_dim,
                                   config.mamba_conv)
        else:
            raise LabError(f"core must be 'transformer' or 'mamba2', got {config.core!r}")
        # Answer space: "task" masks every logit but the task's names, values and HALT (the loss and
        # the argmax then range over those only); "full" reads the whole vocabulary.
        V = base.unembed.weight.shape[0]
        bias = torch.zeros(V)
        if config.answer_space == "task":
            bias.fill_(-1e9)
            bias[self.vocab.name_ids] = 0.0
            bias[self.vocab.value_ids] = 0.0
            bias[self.vocab.halt_id] = 0.0
        self.register_buffer("answer_bias", bias, persistent=False)
        # the published loop ends every iteration with an RMSNorm (weight ones at init)
        self.loop_norm = nn.RMSNorm(d) if config.loop_norm else None
        self.upper = self.head = None
        if config.loop == "paper":
            self._build_paper_loop(base)
        elif config.loop != "standard":
            raise LabError(f"loop must be 'standard' or 'paper', got {config.loop!r}")
        self.init_weights()

    def _build_paper_loop(self, base) -> None:
        """The published Mamba2 loop: copies of the base's top `loop_blocks` blocks (frozen, peft LoRA on each
        mixer's in/out projection) re-run inside every loop, and a trainable copy of the head. Copies, so the
        shared frozen base (and every other model on it) stays untouched."""
        cfg = self.config
        first, n = paper_split(base, cfg.loop_blocks)
        self.upper = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(first, first + n))
        for p in self.upper.parameters():
            p.requires_grad = False
        fit = min(min(m.in_features, m.out_features) for name, m in self.upper.named_modules()
                  if isinstance(m, nn.Linear) and name.split(".")[-1] in LORA_TARGETS)
        if cfg.lora_rank > fit:
            raise LabError(f"lora_rank {cfg.lora_rank} does not fit the re-run blocks of {base.name!r}: their "
                           f"{'/'.join(LORA_TARGETS)} projections allow a rank of at most {fit}")
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), bias="none")
        self.upper = inject_adapter_in_model(lora, self.upper)
        for name, p in self.upper.named_parameters():
            p.requires_grad = "lora_" in name
        self.upper.float()   # the loop computes in float32 (a half-precision base's copies too)
        self.head = nn.Parameter(base.unembed.weight.detach().clone().float())   # (V, d), untied from the embedding

    def init_weights(self) -> None:
        # The output projection starts at zero: at init every loop returns the base's own state.
        nn.init.zeros_(self.core.out_proj.weight)
        nn.init.zeros_(self.core.out_proj.bias)
        if isinstance(self.core, Mamba2Core) and self.config.mamba_init == "match":
            self.core.match_init()
        for m in self.core.modules():
            if not isinstance(m, CoreBlock):
                continue
            with torch.no_grad():
                if m.conv_width:
                    # "match": q and k start as the mean of the last few positions, so the query at ":"
                    # holds the asked name and the key at " walnut" holds "K" (with W_K = W_Q below the
                    # lookup has a gradient from step 0; identity taps start it at a bilinear saddle).
                    # "random": identity (the last tap).
                    for conv in (m.q_conv, m.k_conv):
                        conv.weight.zero_()
                        if self.config.core_init == "match":
                            conv.weight.fill_(1.0 / m.conv_width)
                        else:
                            conv.weight[:, 0, -1] = 1.0
                if self.config.core_init == "match":
                    # W_K = W_Q: attention starts content-addressable (a position scores high when it
                    # holds the same tokens as the query), the prior a pointer lookup needs.
                    d = m.proj.weight.shape[0]
                    m.qkv.weight[d: 2 * d] = m.qkv.weight[:d]
                    m.qkv.bias[d: 2 * d] = m.qkv.bias[:d]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the trainable part computes in (float32): the loop state, lifeline, RoPE and core.
        A half-precision base's stream is cast to it on entry to the loop, and the loop state is cast back
        to `base.dtype` only where a frozen base module reads it (its final norm and head)."""
        return self.core.in_proj.weight.dtype

    # --- the base pass ---------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, mask: torch.Tensor, grad: bool = False,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The base's state after `config.base_blocks` blocks (-1: all of them, i.e. the last block's
        output before the final norm) for right-padded ids: (B, T, d).
        grad=True keeps the graph to the input embeddings (for attribution)."""
        base = self.base
        n = self.config.base_blocks
        if n < -1 or n > base.n_layers:
            raise LabError(f"base_blocks must be -1 (all) or 0..{base.n_layers} for {base.name!r}, got {n}")
        if n in (-1, base.n_layers):
            layer, site = base.n_layers - 1, "resid_post"
        else:
            layer, site = n, "resid_pre"     # the stream entering block n = the output of n blocks
        # only the first n blocks run: at the tiny preset (n = 0) the loop reads the embeddings, and a
        # whole base forward with its head would cost ~10% of a training step (the same tensor either way)
        return stream_at(base, layer, site, input_ids=ids if inputs_embeds is None else None,
                         inputs_embeds=inputs_embeds, attention_mask=mask, grad=grad)

    # --- the loop --------------------------------------------------------------------------------
    def _lifeline_term(self, x_prompt: torch.Tensor, mask: torch.Tensor, spec: Lifeline | None,
                       k: int) -> torch.Tensor:
        if spec is not None and k < spec.from_loop:
            spec = None
        gate = self.gate.to(x_prompt.dtype)
        if spec is not None and (spec.ram_dims or spec.alu_dims):
            spec.check_width(gate.numel())
            gate = gate.clone()
            if spec.ram_dims:
                gate[spec.ram_dims] = gate[spec.ram_dims] * spec.ram_scale
            if spec.alu_dims:
                gate[spec.alu_dims] = gate[spec.alu_dims] * spec.alu_scale
        term = gate * x_prompt                                   # (B, T, d)
        if spec is None or spec.mode == "on":
            pass
        elif spec.mode in ("zero", "zero_matched"):
            term = torch.zeros_like(term)
        elif spec.mode == "noise":
            g = torch.Generator(device="cpu").manual_seed(spec.seed * 1000 + k)
            noise = torch.randn(term.shape, generator=g).to(term)
            term = noise * (term.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        elif spec.mode == "shuffle":
            g = torch.Generator(device="cpu").manual_seed(spec.seed)  # one permutation per example, all loops
            out = term.clone()
            for b in range(term.shape[0]):
                n = int(mask[b].sum())
                perm = torch.randperm(n, generator=g).to(term.device)
                out[b, :n] = term[b, perm]
            term = out
        elif spec.mode == "other":
            donor = torch.roll(term, shifts=-1, dims=0)          # example b takes example b+1's term
            dmask = torch.roll(mask, shifts=-1, dims=0).unsqueeze(-1).to(term.dtype)
            term = donor * dmask                                  # the donor's padding contributes nothing
        if spec is not None:
            term = term * spec.scale
        return term

    def run(self, ids: torch.Tensor, mask: torch.Tensor, n_loops: int, lifeline: Lifeline | None = None,
            cache: ActivationCache | None = None, cache_answer_only: bool = True, stop_on_halt: bool = False,
            x0: torch.Tensor | None = None, detach_prompt: bool = True) -> torch.Tensor:
        """Loop `n_loops` times; returns the answer-position logits of every loop: (K, B, V).

        cache: record `loop.{k}.{site}` for every site in LOOP_SITES (answer position only, (B, d),
        unless cache_answer_only=False: (B, T, d)). stop_on_halt: stop once every example has emitted
        HALT (inference); K is then the number of loops actually run. x0: a precomputed base state
        (B, T, d); detach_prompt=False lets gradients flow through the lifeline too (attribution)."""
        if not isinstance(n_loops, int) or isinstance(n_loops, bool) or n_loops < 1:
            raise LabError(f"the loop cap must be a positive integer, got {n_loops!r}")
        x = self.encode(ids, mask) if x0 is None else x0          # (B, T, d), in the base's dtype
        x = x.to(self.dtype)                                     # the loop computes in the core's dtype (no-op for fp32)
        x_prompt = x.detach() if detach_prompt else x            # attribution keeps the lifeline's graph
        ans = mask.sum(1) - 1                                    # (B,) the ':' of "Answer:"
        rows = torch.arange(x.shape[0], device=x.device)
        ref_norms = None
        if lifeline is not None and lifeline.mode == "zero_matched":
            ref = ActivationCache()
            with torch.no_grad():
                self.run(ids, mask, n_loops, cache=ref, cache_answer_only=False, x0=x)
            ref_norms = [ref[f"loop.{k}.after_lifeline"].norm(dim=-1, keepdim=True) for k in range(n_loops)]
        halted = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        out = []
        for k in range(n_loops):
            rec = self._recorder(cache, k, rows, ans, cache_answer_only)
            rec("resid_pre", x)
            term = self._lifeline_term(x_prompt, mask, lifeline, k)
            rec("lifeline", term)
            x = x + term
            if ref_norms is not None and k >= lifeline.from_loop:   # zero_matched: the state takes the intact run's norm at this loop
                x = x * (ref_norms[k] / x.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            rec("after_lifeline", x)
            if self.config.loop_rope:
                x = loop_rope(x, k)
            rec("after_rope", x)
            if self.upper is not None:
                for block in self.upper:
                    x = block(x, attention_mask=mask)
                rec("upper_out", x)
            delta = self.core(x)
            rec("core_out", delta)
            x = x + delta
            rec("after_core", x)
            if self.loop_norm is not None:
                x = self.loop_norm(x)
            rec("latent", x)
            logits = self.logits(x[rows, ans])                   # (B, V) float32
            out.append(logits)
            if stop_on_halt:
                halted |= logits.argmax(-1) == self.vocab.halt_id
                if bool(halted.all()):
                    break
        return torch.stack(out)                                  # (K, B, V)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, d) loop states -> (B, V) float32 answer logits: the base's final norm, then its head (paper loop:
        the trainable head copy), plus the answer-space mask (added in float32: -1e9 would be -inf in float16)."""
        if self.head is None:
            logits = self.base.logits(h.to(self.base.dtype)).float()
        else:
            logits = self.base.final_norm(h.to(self.base.dtype)).float() @ self.head.T
        return logits + self.answer_bias.to(h.device)

    def no_decay(self, name: str) -> bool:
        """Whether AdamW leaves this trainable tensor undecayed (config.decay; the trainer's second group)."""
        rule = self.config.decay
        if rule == "all":
            return False
        if rule == "lora":
            return "lora_" not in name
        return dict(self.named_parameters())[name].ndim < 2   # "matrices": the gate, biases, norm scales

    @staticmethod
    def _recorder(cache, k, rows, ans, answer_only):
        if cache is None:
            return lambda site, t: None

        def rec(site, t):
            cache[f"loop.{k}.{site}"] = (t[rows, ans] if answer_only else t).detach()
        return rec

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor, return_correct: bool = False):
        """Cross-entropy averaged over supervised loops: targets, weights (B, K).
        return_correct: also (B,) bool, every supervised loop's argmax right (the training batch's own
        accuracy, free: it reads the logits the loss already computed)."""
        logits = self.run(ids, mask, targets.shape[1])           # (K, B, V)
        targets, weights = targets.to(logits.device), weights.to(logits.device)  # supervision() builds them on the CPU
        ce = nn.functional.cross_entropy(logits.permute(1, 2, 0).float(), targets, reduction="none")  # (B, K)
        loss = (ce * weights).sum() / weights.sum().clamp_min(1.0)
        if not return_correct:
            return loss
        with torch.no_grad():
            right = logits.argmax(-1).T == targets                # (B, K)
            correct = (right | (weights == 0)).all(dim=1)
        return loss, correct

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def encode_prompts(base, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) for RLF prompts; each prompt is checked for the answer marker and the
    base's context length (LabError naming the offending prompt)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    for p in prompts:
        if not isinstance(p, str) or not p.endswith(ANSWER_MARKER):
            raise LabError(f"every RLF prompt must end with the answer marker {ANSWER_MARKER!r}; got {str(p)[-40:]!r}")
    return base.encode(list(prompts))


@torch.no_grad()
def whiten_in_proj(model: RLF, n_prompts: int = 64) -> None:
    """Data-dependent init of the core's input projection: centre and whiten the starting states of
    training prompts (step -1 of the training stream, never a held-out prompt). The tiny bases'
    name and value embeddings are nearly collinear (mean cosine ~0.85-0.9); whitened, a name's own
    direction dominates, so the content-matching attention of the "match" init finds the assignment
    of the queried name from the first step."""
    cfg = model.config
    probs = train_batch(-1, n_prompts, cfg.seed, cfg.max_train_hops)
    ids, mask = encode_prompts(model.base, [p.prompt for p in probs])
    cache = ActivationCache()
    model.run(ids, mask, 1, cache=cache, cache_answer_only=False)
    # the state the core reads at loop 0 (the paper loop: after the re-run blocks)
    x = cache["loop.0.upper_out" if model.upper is not None else "loop.0.after_rope"]
    # the statistics on the CPU in float64 (a GPU eye/cov/eigh mix fails, MPS has no float64/eigh);
    # copy_ below puts the result back on the parameter's device and dtype
    X = x[mask.bool()].cpu().double()                                   # loop-0 states (N, d)
    mu = X.mean(0)
    ev, U = torch.linalg.eigh(torch.cov((X - mu).T) + 1e-6 * torch.eye(X.shape[1], dtype=X.dtype))
    W = U @ torch.diag(ev.clamp_min(1e-6 * ev.max()) ** -0.5) @ U.T     # (d, d)
    lin = model.core.in_proj
    d_core, d = lin.weight.shape
    reps = -(-d_core // d)
    Wc = torch.cat([W] * reps)[:d_core] / reps ** 0.5                   # tile for wider cores
    lin.weight.copy_(Wc.to(lin.weight.dtype))
    lin.bias.copy_((-(Wc @ mu)).to(lin.bias.dtype))


def paper_split(base, loop_blocks: int = 0) -> tuple[int, int]:
    """(first, n): the paper loop re-runs the base's blocks first..first+n-1, the top n. loop_blocks 0: all but the
    lowest quarter (the published split: layers 6-23 of 24). At least one block must stay below the loop."""
    L = base.n_layers
    n = loop_blocks or L - max(1, L // 4)
    if L < 2 or not 1 <= n <= L - 1:
        raise LabError(f"loop='paper' needs a base with at least 2 blocks and 1 <= loop_blocks <= blocks - 1 "
                       f"({base.name!r} has {L} block{'s' if L != 1 else ''}; loop_blocks={loop_blocks})")
    return L - n, n


def build(config, base) -> RLF:
    """The RLF module for `config` on `base` (seeded by config.seed), on `base.device`, in float32."""
    torch.manual_seed(config.seed)
    model = RLF(config, base).to(base.device)   # initialised on the CPU (same numbers everywhere), then moved
    if config.core_init == "match" and config.core == "transformer":
        whiten_in_proj(model)
    return model
