"""Residual-stream hooks for every supported base: capture, patch, add, and run from embeddings.

Hook sites (TransformerLens-style names):
  blocks.{i}.resid_pre    the stream entering block i            (B, T, d)
  blocks.{i}.resid_post   the stream leaving block i             (B, T, d)
  final                   the final-normed stream (what the head reads)
Hooks live only inside context managers, act only on forwards run by the thread that opened them, and are
removed in `finally`, even on error (see "dispatch" below for how).

    with capture(base) as cache:
        base.model(ids)
    cache.stack("resid_post")                  # (L, B, T, d)
    with add(base, 3, delta):                  # delta: a (d,) / (B,T,d) tensor or a callable(h) -> tensor
        base.model(ids)
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from lab import LabError

SITES = ("resid_pre", "resid_post")


class ActivationCache:
    """Named activations; `stack` gathers one site across layers (or loops) into one tensor."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.store:
            raise LabError(f"no activation named {name!r}; have: {', '.join(self.store) or 'none'}")
        return self.store[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.store[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()

    def stack(self, site: str, prefix: str = "blocks") -> torch.Tensor:
        """All `{prefix}.{i}.{site}` in index order, stacked on a new dim 0."""
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.{re.escape(site)}$")
        found = sorted((int(m.group(1)), k) for k in self.store if (m := pat.match(k)))
        if not found:
            raise LabError(f"no '{prefix}.*.{site}' activations in this cache")
        return torch.stack([self.store[k] for _, k in found])


def _check_layer(base, layer: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LabError(f"layer must be an int, got {layer!r}")
    if not -base.n_layers <= layer < base.n_layers:
        raise LabError(f"layer {layer} is out of range for {base.name!r}, which has {base.n_layers} layers (0..{base.n_layers - 1})")
    return layer % base.n_layers


def _check_site(site: str) -> str:
    if site not in SITES:
        raise LabError(f"site must be one of {SITES}, got {site!r}")
    return site


def _get_hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _set_hidden(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _out_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_out(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


# --- dispatch ------------------------------------------------------------------------------------
# A context does not register its own torch hook. The first context on a module (a block, the final norm)
# installs one dispatcher there, the last one to close removes it (a count across threads, under a lock), and
# each context adds its function to a *thread-local* list that the dispatcher runs. Why: the dashboard shares
# one cached base across Streamlit sessions, which run in threads, and torch hooks act on every forward of
# the module: one session's `inject` or `capture` would act on another session's concurrent forward. Here a
# context affects only the forwards of the thread that opened it, and a base no context is open on carries
# no hook at all. The dispatchers are module-level functions that read the module they are called on.
_local = threading.local()
_lock = threading.Lock()
_installed: dict[tuple[int, str], list] = {}  # (id(module), kind) -> [torch handle, open contexts]


def _active(module, kind: str) -> list | None:
    table = getattr(_local, "table", None)
    return table.get((id(module), kind)) if table else None


def _run_all(fns: list, h: torch.Tensor) -> torch.Tensor:
    """The stream after every active function, in the order their contexts were opened, each seeing the
    stream the previous one left (a function returning None leaves it as it is)."""
    for fn in tuple(fns):
        new = fn(h)
        if new is not None:
            h = new
    return h


def _pre_dispatch(module, args, kwargs):
    fns = _active(module, "pre")
    if not fns:
        return None
    old = _get_hidden(args, kwargs)
    h = _run_all(fns, old)
    return None if h is old else _set_hidden(args, kwargs, h)


def _post_dispatch(module, args, output):
    fns = _active(module, "post")
    if not fns:
        return None
    old = _out_hidden(output)
    h = _run_all(fns, old)
    return None if h is old else _replace_out(output, h)


_DISPATCH = {"pre": _pre_dispatch, "post": _post_dispatch}


def _drop_copied_dispatcher(module, kind: str) -> None:
    """A deep copy of a module taken while a context was open carries that dispatcher in its hook dicts
    (torch's private attributes, read only here); a second one would run every function twice."""
    hooks_dict = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
    for key in [k for k, v in hooks_dict.items() if v is _DISPATCH[kind]]:
        del hooks_dict[key]
        for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(module, extra, {}).pop(key, None)


def _acquire(keys: list) -> None:
    """Count one more open context on each (module, kind), installing its dispatcher on the first."""
    with _lock:
        for module, kind in keys:
            slot = _installed.get((id(module), kind))
            if slot is None:
                _drop_copied_dispatcher(module, kind)
                handle = (module.register_forward_pre_hook(_pre_dispatch, with_kwargs=True) if kind == "pre"
                          else module.register_forward_hook(_post_dispatch))
                slot = _installed[(id(module), kind)] = [handle, 0]
            slot[1] += 1


def _release(keys: list) -> None:
    """One open context fewer on each (module, kind), removing its dispatcher after the last."""
    with _lock:
        for module, kind in keys:
            slot = _installed[(id(module), kind)]
            slot[1] -= 1
            if not slot[1]:
                slot[0].remove()
                del _installed[(id(module), kind)]


def _entry(base, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """(module, kind, fn): fn(hidden) -> new hidden or None, on block `layer` at `site`."""
    return base.blocks[layer], ("pre" if site == "resid_pre" else "post"), fn


@contextlib.contextmanager
def _hooks(entries: Iterable) -> Iterator[None]:
    """Activate (module, kind, fn) entries for this thread's forwards; deactivated on exit, even on error."""
    entries = list(entries)
    table = getattr(_local, "table", None)
    if table is None:
        table = _local.table = {}
    keys = [(module, kind) for module, kind, _ in entries]
    _acquire(keys)
    try:
        for module, kind, fn in entries:
            table.setdefault((id(module), kind), []).append(fn)
        yield
    finally:
        for module, kind, fn in reversed(entries):
            key = (id(module), kind)
            fns = table.get(key, ())
            # by identity, the last one: nested contexts may hold equal-comparing functions
            for i in range(len(fns) - 1, -1, -1):
                if fns[i] is fn:
                    del fns[i]
                    break
            if not fns:
                table.pop(key, None)
        _release(keys)


def active(base) -> int:
    """How many hook functions this thread has active on `base` (0 outside every context)."""
    table = getattr(_local, "table", None) or {}
    ids = {id(m) for m in (*base.blocks, base.final_norm)}
    return sum(len(fns) for (mid, _), fns in table.items() if mid in ids)


@contextlib.contextmanager
def capture(base, layers: Sequence[int] | None = None, sites: Sequence[str] = SITES,
            final: bool = True, detach: bool = True) -> Iterator[ActivationCache]:
    """Record the residual stream at every (or the given) layer and site, and the final normed state."""
    cache = ActivationCache()
    layers = [_check_layer(base, i) for i in (range(base.n_layers) if layers is None else layers)]
    for s in sites:
        _check_site(s)

    def recorder(name):
        def fn(h):
            cache[name] = h.detach() if detach else h
            return None
        return fn

    entries = [_entry(base, i, s, recorder(f"blocks.{i}.{s}")) for i in layers for s in sites]
    if final:
        entries.append((base.final_norm, "post", recorder("final")))
    with _hooks(entries):
        yield cache


def _check_values(base, name: str, value: torch.Tensor, hidden: torch.Tensor, positions) -> None:
    if not torch.is_tensor(value):
        raise LabError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != hidden.dtype:
        raise LabError(f"{name} has dtype {value.dtype}, but the residual stream is {hidden.dtype}")
    target = hidden.shape if positions is None else (hidden.shape[0], len(positions), *hidden.shape[2:])
    # value must broadcast *to* the stream's shape (h + value keeps h's shape); a plain tuple check,
    # because torch.broadcast_shapes costs ~75 us, a visible share of a small base's forward per hook
    if len(value.shape) > len(target) or any(v not in (1, t) for v, t in zip(reversed(value.shape), reversed(target))):
        raise LabError(f"{name} of shape {tuple(value.shape)} does not broadcast to the stream's "
                       f"{tuple(target)} (B, T{'' if positions is None else '[positions]'}, d={base.d_model})")


def _positions(positions, T: int):
    if positions is None:
        return None
    pos = list(positions) if not isinstance(positions, int) else [positions]
    bad = [p for p in pos if not -T <= p < T]
    if bad:
        raise LabError(f"positions {bad} are out of range for a sequence of {T} tokens")
    return pos


@contextlib.contextmanager
def patch(base, layer: int, values: torch.Tensor, positions: Sequence[int] | int | None = None,
          site: str = "resid_post") -> Iterator[None]:
    """Replace the stream at `layer`/`site` (at `positions`, or everywhere) with `values`."""
    layer, site = _check_layer(base, layer), _check_site(site)

    def fn(h):
        pos = _positions(positions, h.shape[1])
        _check_values(base, "patch values", values, h, pos)
        if pos is None:
            return values.expand_as(h).clone()
        h = h.clone()
        h[:, pos] = values.expand_as(h[:, pos])
        return h

    with _hooks([_entry(base, layer, site, fn)]):
        yield


@contextlib.contextmanager
def add(base, layer: int, delta: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
        positions: Sequence[int] | int | None = None, site: str = "resid_pre") -> Iterator[None]:
    """Add `delta` (a tensor broadcastable to (B, T, d), or a callable h -> such a tensor, e.g. a
    module) to the stream at `layer`/`site`, cast to the stream's dtype. The primitive that channels and
    lifelines build on."""
    with add_to_layers(base, {layer: delta}, positions, site):
        yield


def _fixed_add(base, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h + delta for a fixed tensor at every position: the channels' hot path, so the shape check
    and the cast to the stream's dtype run once per stream shape and dtype, and nothing else per call."""
    as_stream = {}  # (shape, dtype) -> the delta in that dtype

    def fn(h):
        d = as_stream.get((h.shape, h.dtype))
        if d is None:
            d = as_stream[(h.shape, h.dtype)] = _to_stream(delta, h)
            _check_values(base, "added delta", d, h, None)
        return h + d
    return fn


def _to_stream(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """An added delta in the stream's dtype and device: a half-precision base's stream may itself change
    dtype between blocks (Mamba2 keeps its residual in float32), and h + delta must not promote it."""
    if not torch.is_tensor(delta) or (delta.dtype == h.dtype and delta.device == h.device):
        return delta
    if not torch.is_floating_point(delta):
        raise LabError(f"added delta must be a floating-point tensor, got dtype {delta.dtype}")
    return delta.to(device=h.device, dtype=h.dtype)


@contextlib.contextmanager
def add_to_layers(base, deltas: Mapping[int, torch.Tensor | Callable[[torch.Tensor], torch.Tensor]],
                  positions: Sequence[int] | int | None = None, site: str = "resid_pre") -> Iterator[None]:
    """`add` at several layers in one context: {layer: delta}. One context instead of one per layer
    matters on small bases, where per-forward Python setup is a visible share of the forward."""
    site = _check_site(site)
    checked = {}
    for layer, delta in deltas.items():
        if not callable(delta) and not torch.is_tensor(delta):
            raise LabError(f"delta must be a tensor or a callable, got {type(delta).__name__}")
        checked[_check_layer(base, layer)] = delta

    def make(delta):
        fixed = torch.is_tensor(delta)
        if fixed and positions is None:
            return _fixed_add(base, delta)
        checked_shapes = set()  # a fixed tensor is checked once per stream shape, not on every call

        def fn(h):
            d = _to_stream(delta if fixed else delta(h), h)
            pos = _positions(positions, h.shape[1])
            if not fixed or (h.shape, h.dtype) not in checked_shapes:
                _check_values(base, "added delta", d, h, pos)
                if fixed:
                    checked_shapes.add((h.shape, h.dtype))
            if pos is None:
                return h + d
            h = h.clone()
            h[:, pos] = h[:, pos] + d
            return h
        return fn

    with _hooks(_entry(base, layer, site, make(delta)) for layer, delta in checked.items()):
        yield


def forward(base, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None):
    """One forward of the base from token ids or from input embeddings (for latent steps)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise LabError("give exactly one of input_ids or inputs_embeds")
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != base.d_model:
            raise LabError(f"inputs_embeds must be (B, T, {base.d_model}), got {tuple(inputs_embeds.shape)}")
        if inputs_embeds.dtype != base.dtype:
            raise LabError(f"inputs_embeds has dtype {inputs_embeds.dtype}, the base expects {base.dtype}")
        base.check_length(inputs_embeds.shape[1])
        return base.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    base.check_length(input_ids.shape[1])
    return base.model(input_ids=input_ids, attention_mask=attention_mask)


def run_with_cache(base, input_ids=None, inputs_embeds=None, attention_mask=None, **capture_kw):
    """(model output, ActivationCache) for one forward."""
    with capture(base, **capture_kw) as cache:
        out = forward(base, input_ids, inputs_embeds, attention_mask)
    return out, cache


class _StreamReached(Exception):
    """Raised by `stream_at`'s hook to end a forward once the wanted state exists."""


def stream_at(base, layer: int, site: str, input_ids: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              grad: bool = False) -> torch.Tensor:
    """The stream at `blocks.{layer}.{site}` for one forward, running the base only as far as that state:
    the blocks after it, the final norm and the head are skipped (the forward is ended by an exception
    from the hook). Why: a mechanism that reads an early state of a frozen base (RLF's loop starts from
    the embeddings) would otherwise pay for the whole base and its head on every step. The value is
    the same tensor a full forward with `capture` records. grad=True keeps its graph (attribution)."""
    layer, site = _check_layer(base, layer), _check_site(site)
    found: list[torch.Tensor] = []

    def stop(h):
        found.append(h)
        raise _StreamReached

    try:
        with torch.set_grad_enabled(grad), _hooks([_entry(base, layer, site, stop)]):
            forward(base, input_ids, inputs_embeds, attention_mask)
    except _StreamReached:
        pass
    if not found:  # a base whose forward never reached the block (should not happen)
        raise LabError(f"the forward of {base.name!r} never reached blocks.{layer}.{site}")
    return found[0] if grad else found[0].detach()


def hidden_states_as_cache_order(base, hidden_states: tuple) -> dict[str, torch.Tensor]:
    """Map HF `output_hidden_states` onto our site names (its layout differs by family)."""
    L = base.n_layers
    if base.hidden_layout == "inputs":  # (embeddings = resid_pre 0, ..., resid_pre L-1, final normed)
        out = {f"blocks.{i}.resid_pre": hidden_states[i] for i in range(L)}
    else:  # Mamba2: (resid_post 0, ..., resid_post L-2, final normed)
        out = {f"blocks.{i}.resid_post": hidden_states[i] for i in range(L - 1)}
    out["final"] = hidden_states[L]
    return out
