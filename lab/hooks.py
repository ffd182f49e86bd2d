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
# A context registers no torch hook. The first context on a module (a block, the final norm) puts a dispatching
# `forward` on that module instance; it runs this thread's functions for the module before ("pre") and after
# ("post") the module's own forward. The last context to close takes it off again (a count across threads,
# under a lock), so a base no context is open on is untouched. Each context adds its functions to a
# *thread-local* table. Why:
# - torch hooks act on every forward of a module, whatever thread runs it, and the dashboard shares one cached
#   base across Streamlit sessions, which run in threads: one session's `inject` or `capture` would act on
#   another session's concurrent forward;
# - a module with any torch hook leaves torch's fast call path, and registering and removing one costs ~10 us
#   in situ: on a small base's forward (4 blocks, ~2-4 ms) that is a visible share of the channels'
#   per-context cost (bench/bench_channels.py). An instance `forward` keeps the fast path and costs one
#   Python call; putting it on and taking it off is a dict write.
# It is the mechanism accelerate's `add_hook_to_module` uses (a forward it already put there is kept and called).
_local = threading.local()
_lock = threading.Lock()
_installed: dict[int, list] = {}  # id(module) -> [module, open contexts]


def _run_all(fns: list, h: torch.Tensor) -> torch.Tensor:
    """The stream after every active function, in the order their contexts were opened, each seeing the
    stream the previous one left (a function returning None leaves it as it is)."""
    for fn in tuple(fns):
        new = fn(h)
        if new is not None:
            h = new
    return h


def _dispatching_forward(self, *args, **kwargs):
    """The instance `forward` of a module some context is open on: this thread's "pre" functions on the
    stream entering it, the module's own forward, this thread's "post" functions on the stream leaving it."""
    inner = self.__dict__.get("_lab_inner_forward")
    if inner is None:
        inner = type(self).forward.__get__(self)
    table = getattr(_local, "table", None)
    fns = table.get(id(self)) if table else None
    if not fns:
        return inner(*args, **kwargs)
    pre, post = fns
    if pre:
        old = _get_hidden(args, kwargs)
        h = _run_all(pre, old)
        if h is not old:
            args, kwargs = _set_hidden(args, kwargs, h)
    output = inner(*args, **kwargs)
    if post:
        old = _out_hidden(output)
        h = _run_all(post, old)
        if h is not old:
            output = _replace_out(output, h)
    return output


def _is_dispatching(forward) -> bool:
    return getattr(forward, "__func__", None) is _dispatching_forward


def _acquire(modules: list) -> None:
    """Count one more open context on each module, putting the dispatching forward on it on the first."""
    with _lock:
        for module in modules:
            slot = _installed.get(id(module))
            if slot is None:
                own = vars(module)
                # a deep copy taken while a context was open already carries one (bound to the copy)
                if not _is_dispatching(own.get("forward")):
                    if "forward" in own:  # e.g. accelerate's: ours runs around it
                        own["_lab_inner_forward"] = own["forward"]
                    own["forward"] = _dispatching_forward.__get__(module)
                slot = _installed[id(module)] = [module, 0]
            slot[1] += 1


def _release(modules: list) -> None:
    """One open context fewer on each module, restoring its own forward after the last."""
    with _lock:
        for module in modules:
            slot = _installed[id(module)]
            slot[1] -= 1
            if not slot[1]:
                del _installed[id(module)]
                own = vars(module)
                if not _is_dispatching(own.get("forward")):
                    # something put its own forward over ours while the context was open (accelerate's
                    # add_hook_to_module keeps ours as the one it calls): ours stays beneath it, idle
                    continue
                inner = own.pop("_lab_inner_forward", None)
                if inner is None:
                    del own["forward"]
                else:
                    own["forward"] = inner


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
    modules = [module for module, _, _ in entries]
    _acquire(modules)
    try:
        for module, kind, fn in entries:
            table.setdefault(id(module), ([], []))[kind == "post"].append(fn)
        yield
    finally:
        for module, kind, fn in reversed(entries):
            fns = table.get(id(module))
            if fns is None:
                continue
            side = fns[kind == "post"]
            # by identity, the last one: nested contexts may hold equal-comparing functions
            for i in range(len(side) - 1, -1, -1):
                if side[i] is fn:
                    del side[i]
                    break
            if not fns[0] and not fns[1]:
                del table[id(module)]
        _release(modules)


def active(base) -> int:
    """How many hook functions this thread has active on `base` (0 outside every context)."""
    table = getattr(_local, "table", None) or {}
    ids = {id(m) for m in (*base.blocks, base.final_norm)}
    return sum(len(pre) + len(post) for mid, (pre, post) in table.items() if mid in ids)


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


def _check_finite(name: str, value) -> None:
    """A tensor given to a hook must hold numbers: NaN or inf would silently turn every later state into NaN."""
    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise LabError(f"{name} holds NaN or inf values; expected finite numbers")


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
    """Replace the stream at `layer`/`site` (at `positions`, or everywhere) with `values` (finite numbers)."""
    layer, site = _check_layer(base, layer), _check_site(site)
    _check_finite("patch values", values)

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
        _check_finite(f"the delta for layer {layer}", delta)
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


@contextlib.contextmanager
def add_to_every_layer(base, deltas: Sequence[torch.Tensor], site: str = "resid_pre") -> Iterator[None]:
    """`add_to_layers` for one fixed tensor per layer, in layer order: the channels' per-context hot path,
    which skips the per-layer index checks and closures a mapping of arbitrary layers needs (a small
    base's forward is ~4 ms, and this runs once per channel state)."""
    kind = "pre" if _check_site(site) == "resid_pre" else "post"
    if len(deltas) != base.n_layers:
        raise LabError(f"give one delta per layer: {base.name!r} has {base.n_layers} layers, got {len(deltas)} deltas")
    with _hooks([(block, kind, _fixed_add(base, d)) for block, d in zip(base.blocks, deltas)]):
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
        _check_finite("inputs_embeds", inputs_embeds)
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
