"""Injection of six state channels into every layer of any base, through `lab.hooks`, behind ReZero gates.

Two variants, one module class (`ChannelInjector`, chosen by `mode`):

* ``"additive"`` (default) — per layer l and channel c a linear projection W[l,c] of the channel vector
  to d_model, scaled by its own scalar gate alpha[l,c] (init 0) and added to the residual stream:

      h_l <- h_l + sum_c alpha[l,c] * W[l,c] x_c                        # (B, 1, d) broadcast over T

  This is exactly what the published per-channel cross-attention computes when each channel is a
  single key/value token: softmax over one key is 1, so attention reduces to the gated,
  query-independent bias alpha * W_o W_v x_c. We implement that reduced form directly (one matmul per
  forward, not per token), which is why its overhead is negligible.

* ``"xattn"`` — the variant where attention actually matters: each channel becomes ``n_tokens`` key/value
  tokens (a learned map of x_c), and every position's query (a parameter-free layer norm of h_l, projected)
  attends over its own channel's tokens, one softmax per channel; the per-channel outputs are gated by
  alpha[l,c] and summed into the residual. The output depends on the query, so different positions can
  read different parts of a channel.

Site: ``resid_pre`` of every block (the stream entering block i), so "channels from layer 1" means the
very first block already sees them. The hooks come from `lab.hooks.add_to_every_layer` (one delta per layer, one
context; the xattn variant: `add_to_layers`): they act only on forwards of the thread that opened the context,
and are gone when it exits, even on error. The cost is a fixed amount per context (check the values, one batched
matmul for every layer's delta, activate the hooks: 0.3-0.75 ms on tiny-gpt2 by machine, ~8 ms on a
GPT-2-124M shape, where the matmul reads an 85-MB projection) plus one add per layer and forward
(bench/bench_channels.py).

Zero-init guarantee: alpha starts at 0 and the projections have no bias, so (a) at init the model is
bit-identical to its base for any channel values (h + 0 == h exactly), and (b) a channel whose input is
all zeros contributes exactly nothing: "channel zeroed" is the same thing as "channel removed".
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lab import LabError, hooks

CHANNELS = ("memory", "affect", "time", "ethics", "identity", "continuity")
MODES = ("additive", "xattn")


def check_widths(widths: Mapping[str, int]) -> dict[str, int]:
    """Validate a {channel name: width} spec (any names, positive int widths)."""
    if not isinstance(widths, Mapping) or not widths:
        raise LabError(f"channel widths must be a non-empty mapping name -> width, got {widths!r}")
    out = {}
    for name, w in widths.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise LabError(f"channel name must be an identifier string, got {name!r}")
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise LabError(f"width of channel {name!r} must be a positive int, got {w!r}")
        out[name] = w
    return out


def _checked_rows(values, widths: Mapping[str, int], batch: int | None):
    """Names, shapes, dtypes and one batch size (Python-only checks): ({name: (b, width)}, B, device)."""
    if not isinstance(values, Mapping):
        raise LabError(f"channel values must be a mapping name -> tensor, got {type(values).__name__}")
    unknown = [k for k in values if k not in widths]
    if unknown:
        raise LabError(f"unknown channel name(s) {unknown}; this injector has channels {list(widths)}")
    rows = {}
    for name, v in values.items():
        if not torch.is_tensor(v):
            raise LabError(f"channel {name!r} must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() == 1:
            v = v.unsqueeze(0)
        if v.dim() != 2 or v.shape[-1] != widths[name]:
            raise LabError(f"channel {name!r} must have shape (B, {widths[name]}) or ({widths[name]},), "
                           f"got {tuple(v.shape)}")
        if not torch.is_floating_point(v):
            raise LabError(f"channel {name!r} must be a floating-point tensor, got dtype {v.dtype}")
        rows[name] = v
    sizes = {v.shape[0] for v in rows.values()}
    if batch is not None:
        sizes.add(batch)
    sizes.discard(1)  # batch 1 broadcasts
    if len(sizes) > 1:
        raise LabError(f"channel batch sizes disagree: {sorted(sizes)} "
                       f"({ {k: v.shape[0] for k, v in rows.items()} }{'' if batch is None else f', input batch {batch}'})")
    B = sizes.pop() if sizes else 1
    device = next((v.device for v in rows.values()), torch.device("cpu"))
    return rows, B, device


def _raise_non_finite(rows: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Name the channel whose values are not finite, in the caller's values or once cast to `dtype`
    (a finite 1e5 is inf in float16). Returns without raising only if every value is finite in both."""
    for name, v in rows.items():
        if not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise LabError(f"channel {name!r} holds {bad} NaN or infinite value(s); expected finite numbers")
        cast = v.to(dtype)
        if not torch.isfinite(cast).all():
            big = float(v[~torch.isfinite(cast)].abs().max())
            raise LabError(f"channel {name!r} holds a value of magnitude {big:.3g}, beyond the range of the base's "
                           f"{dtype} (max {torch.finfo(dtype).max:.3g}); expected values that fit it")


def check_channel_values(values: Mapping[str, torch.Tensor], widths: Mapping[str, int],
                         batch: int | None = None, dtype: torch.dtype = torch.float32,
                         check_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Validate channel inputs: known names, (B, width) or (width,) shapes, one batch size, finite values
    (also once cast to `check_dtype`, the base's dtype: a finite 1e5 is inf in float16).

    Channels not given are zeros (= switched off, see module doc). Returns {name: (B, width)} in `dtype`
    for every channel in `widths`, in its order.
    """
    rows, B, device = _checked_rows(values, widths, batch)
    check_dtype = check_dtype or dtype
    # one finiteness check over all channels; name the culprits only on failure
    if rows and not torch.isfinite(torch.cat([v.reshape(-1).to(check_dtype) for v in rows.values()])).all():
        _raise_non_finite(rows, check_dtype)
    out = {}
    for name, w in widths.items():
        v = rows.get(name)
        out[name] = torch.zeros(B, w, dtype=dtype, device=device) if v is None else v.to(dtype).expand(B, w)
    return out


def concat_channel_values(values: Mapping[str, torch.Tensor], widths: Mapping[str, int],
                          batch: int | None = None, dtype: torch.dtype = torch.float32,
                          check_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same checks as `check_channel_values`, returning the channels concatenated in `widths` order:
    (B, sum of widths) in `dtype`. The additive injection's hot path: one cat and one finiteness check."""
    rows, B, device = _checked_rows(values, widths, batch)
    parts = []
    for n, w in widths.items():
        v = rows.get(n)
        if v is None:
            v = torch.zeros(B, w, dtype=dtype, device=device)
        else:
            v = v if v.dtype == dtype else v.to(dtype)
            v = v if v.shape[0] == B else v.expand(B, w)
        parts.append(v)
    xc = torch.cat(parts, -1)
    # fast path: a finite sum proves every value finite (NaN and inf propagate); only a non-finite sum,
    # which an overflow of large finite values can also give, pays for the element-wise check.
    # The check runs on the values in the base's dtype, so a finite float32 value that overflows it is caught.
    check_dtype = check_dtype or dtype
    checked = xc if check_dtype == dtype else xc.to(check_dtype)
    if not math.isfinite(float(checked.detach().sum())) and not torch.isfinite(checked).all():
        _raise_non_finite(rows, check_dtype)
        raise LabError(f"channel values hold NaN or infinite numbers once cast to {check_dtype}; expected finite numbers")
    return xc


class ChannelInjector(nn.Module):
    """Per-layer, per-channel projections to d_model with ReZero gates alpha (n_layers, n_channels) = 0."""

    def __init__(self, d_model: int, n_layers: int, widths: Mapping[str, int], mode: str = "additive",
                 n_tokens: int = 4, n_heads: int = 4, proj_lr_ratio: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise LabError(f"injection mode must be one of {MODES}, got {mode!r}")
        if d_model < 1 or n_layers < 1:
            raise LabError(f"d_model and n_layers must be >= 1, got {d_model}, {n_layers}")
        self.widths = check_widths(widths)
        self.names = list(self.widths)
        self.d_model, self.n_layers, self.mode = d_model, n_layers, mode
        if not 0 < proj_lr_ratio <= 1:
            raise LabError(f"proj_lr_ratio must be in (0, 1], got {proj_lr_ratio}")
        # The additive projection is stored divided by this ratio and multiplied back on use, so Adam's
        # per-element step on it is `ratio` times the gates': the gates move fast, the (identity-
        # initialised) projections slowly, without a second optimizer parameter group.
        self.proj_scale = float(proj_lr_ratio)
        C, L, d = len(self.names), n_layers, d_model
        self.alpha = nn.Parameter(torch.zeros(L, C))  # the ReZero gates: which layer opens which channel
        # which channel each input dimension belongs to, in the concatenated (B, W) channel vector
        self.register_buffer("chan_of_dim", torch.repeat_interleave(
            torch.arange(C), torch.tensor([self.widths[n] for n in self.names])), persistent=False)
        if mode == "additive":
            # W[l, c] for all channels at once: rows of channel c are its slice of the W = sum(widths) axis,
            # so one batched matmul per forward serves every layer and channel.
            self.proj = nn.Parameter(torch.empty(L, int(self.chan_of_dim.numel()), d))
        else:
            if d % n_heads:
                raise LabError(f"d_model {d} is not divisible by n_heads {n_heads} for the xattn variant")
            if n_tokens < 1:
                raise LabError(f"n_tokens must be >= 1, got {n_tokens}")
            self.n_tokens, self.n_heads = n_tokens, n_heads
            # channel vector -> n_tokens tokens of width d (shared by layers); per layer q/k/v/o maps.
            self.tok = nn.ParameterDict({n: nn.Parameter(torch.empty(w, n_tokens * d)) for n, w in self.widths.items()})
            self.wq = nn.Parameter(torch.empty(L, d, d))
            self.wk = nn.Parameter(torch.empty(L, d, d))
            self.wv = nn.Parameter(torch.empty(L, d, d))
            self.wo = nn.Parameter(torch.empty(L, d, d))
        self.init_weights()

    def init_weights(self, seed: int | None = None, identity: tuple[str, ...] = ()) -> None:
        """alpha = 0 (bit-identity); projections N(0, 1/fan_in) so W x has unit scale for unit-scale x,
        which gives alpha a useful gradient from the first step.

        identity: channels (of width d_model, additive mode) whose projection starts as the identity:
        right for text channels embedded in the base's own residual space (the default text encoder),
        where "raise what the channel names" is then the starting point instead of something a map
        must learn from a few dozen training entities (which does not transfer to held-out ones)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.alpha.zero_()
            for p in self.parameters():
                if p is self.alpha:
                    continue
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-2]))
            if self.mode == "additive":  # fan-in per channel slice: each channel's W x has unit scale
                widths = torch.tensor([self.widths[n] for n in self.names], dtype=torch.float32)
                self.proj.mul_((math.sqrt(self.proj.shape[1]) / widths.sqrt())[self.chan_of_dim][None, :, None])
                self.proj.div_(self.proj_scale)
                offsets = dict(zip(self.names, torch.cumsum(torch.tensor([0] + [self.widths[n] for n in self.names]), 0).tolist()))
                for n in identity:
                    if n not in self.widths or self.widths[n] != self.d_model:
                        raise LabError(f"identity init needs a channel of width d_model={self.d_model}, got {n!r}")
                    o = offsets[n]
                    self.proj[:, o: o + self.d_model] = torch.eye(self.d_model) / self.proj_scale

    @staticmethod
    def param_count(d_model: int, n_layers: int, widths: Mapping[str, int], mode: str = "additive",
                    n_tokens: int = 4) -> int:
        """The parameters an injector of this shape has, without building it (a GPT-2-sized one is ~85 MB):
        what the channel-vs-text experiment matches the text arm's adapter to. Kept beside the layout above."""
        L, d, widths = n_layers, d_model, check_widths(widths)
        gates = L * len(widths)
        if mode == "additive":
            return gates + L * sum(widths.values()) * d
        return gates + sum(widths.values()) * n_tokens * d + 4 * L * d * d

    # --- computation ---------------------------------------------------------------------------

    def additive_deltas(self, x: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """(L, B, d): sum_c alpha[l,c] W[l,c] x_c for every layer at once.

        x: {name: (B, width)}, or those already concatenated in `names` order, (B, sum of widths)."""
        xc = x if torch.is_tensor(x) else torch.cat([x[n] for n in self.names], -1)  # (B, W)
        # the stored-projection scale is folded into the (L, C) gates before the gather: one op fewer per forward
        gates = self.alpha if self.proj_scale == 1.0 else self.alpha * self.proj_scale
        # index_select, not gates[:, idx]: advanced indexing costs ~6 us more, a per-context cost
        gated = xc * gates.index_select(1, self.chan_of_dim).unsqueeze(1)   # (L, B, W): alpha[l, c(w)] x_w
        return torch.bmm(gated, self.proj)                                   # (L, B, d)

    def channel_tokens(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C, K, d): each channel's key/value tokens (xattn variant)."""
        d, K = self.d_model, self.n_tokens
        return torch.stack([(x[n] @ self.tok[n]).view(-1, K, d) for n in self.names], 1)

    def xattn_delta(self, layer: int, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, d): per-channel cross-attention of the stream's queries over that channel's tokens."""
        B, T, d = h.shape
        H, e = self.n_heads, d // self.n_heads
        h = h.to(self.wq.dtype)  # a half-precision base's stream; the injector computes in its own dtype
        q = (F.layer_norm(h, (d,)) @ self.wq[layer]).view(B, T, H, e)            # (B, T, H, e)
        k = (tokens @ self.wk[layer]).view(*tokens.shape[:3], H, e)              # (B, C, K, H, e)
        v = (tokens @ self.wv[layer]).view(*tokens.shape[:3], H, e)
        att = torch.einsum("bthe,bckhe->bhtck", q, k) / math.sqrt(e)
        att = att.softmax(-1)                                                    # softmax within each channel
        o = torch.einsum("bhtck,bckhe->btche", att, v).reshape(B, T, -1, d)      # (B, T, C, d)
        o = o @ self.wo[layer]
        return torch.einsum("btcd,c->btd", o, self.alpha[layer])

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def alpha_table(self) -> list[dict]:
        a = self.alpha.detach().cpu()
        return [{"layer": i, **{n: float(a[i, c]) for c, n in enumerate(self.names)}} for i in range(self.n_layers)]


@contextlib.contextmanager
def inject(base, injector: ChannelInjector, channels: Mapping[str, torch.Tensor] | None,
           batch: int | None = None, site: str = "resid_pre") -> Iterator[None]:
    """Within this context every forward of `base` carries the channels (hooks on every layer's `site`).

    channels: {name: (B, width) or (width,)}; missing channels are zero (off). None: no hooks at all.
    """
    if channels is None:
        yield
        return
    if injector.d_model != base.d_model or injector.n_layers != base.n_layers:
        raise LabError(f"injector built for d_model={injector.d_model}, {injector.n_layers} layers, but base "
                       f"{base.name!r} has d_model={base.d_model}, {base.n_layers} layers")
    device = injector.alpha.device
    if device != base.device:
        raise LabError(f"the injector is on {device} but base {base.name!r} is on {base.device}; move it with .to()")
    # the injector computes in its own dtype (float32 parameters, also beside a half-precision base); values
    # are checked in the base's dtype, and lab.hooks casts each delta to the stream's dtype
    dtype = injector.alpha.dtype
    if injector.mode == "additive":
        # the per-context cost is a visible share of a small base's forward: one cat, one finiteness check,
        # one batched matmul for every layer and channel (bench/bench_channels.py)
        xc = concat_channel_values(channels, injector.widths, batch, dtype=dtype, check_dtype=base.dtype)
        deltas = injector.additive_deltas(xc.to(device)).unsqueeze(2)          # (L, B, 1, d)
        context = hooks.add_to_every_layer(base, deltas.unbind(0), site=site)
    else:
        x = check_channel_values(channels, injector.widths, batch, dtype=dtype, check_dtype=base.dtype)
        x = {k: (v if v.device == device else v.to(device)) for k, v in x.items()}
        tokens = injector.channel_tokens(x)                                    # (B, C, K, d)
        per_layer = {layer: (lambda h, layer=layer: injector.xattn_delta(layer, h, tokens))
                     for layer in range(base.n_layers)}
        context = hooks.add_to_layers(base, per_layer, site=site)
    with context:
        yield
