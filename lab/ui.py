"""Small Streamlit helpers shared by the app pages (display only; computation stays in lab/).

For any page that shows generated text: `compare_outputs` (two continuations side by side, wrapped, the
tokens that differ highlighted), `logprob_strip` (a per-token value as a coloured strip), `token_pieces`
and `prefix_scores` (per-token log-probabilities from any scorer of whole continuations), and
`disabled_reason` (a control that cannot act says why)."""

from __future__ import annotations

import difflib
import functools
import gc
import html
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import streamlit as st
import torch

from lab import LabError, models_dir
from lab.bases import list_bases, load_base
from lab.figures import to_bytes
from lab.store import broken_artifacts, manifest_base_name, manifests
from lab.store import find_artifacts as artifacts  # noqa: F401  (the pages' artifact pickers)


def cached_resource(show_spinner: str):
    """`st.cache_resource` that, after loading, moves everything alive out of the cyclic garbage collector's
    reach (`gc.freeze`): the app holds ~0.5M long-lived objects (libraries, models, caches), a full collection
    walks them all (~300 ms here), and whichever slider move triggers one waits for it (`bench/bench_app.py`)."""
    def decorate(load: Callable):
        @functools.wraps(load)
        def load_then_freeze(*args, **kwargs):
            out = load(*args, **kwargs)
            gc.collect()
            gc.freeze()
            return out
        return st.cache_resource(show_spinner=show_spinner)(load_then_freeze)
    return decorate


@cached_resource(show_spinner="loading base…")
def cached_base(name: str):
    return load_base(name)


def bases_on_disk() -> list[str]:
    return [r["name"] for r in list_bases() if r["on_disk"]]


def base_picker(key: str = "base", prefer: tuple[str, ...] = ("tiny-gpt2", "smoke-gpt2")):
    """A select box of the bases on disk; stops the page with the exact command when there are none."""
    names = bases_on_disk()
    if not names:
        st.warning("No base is on disk yet. Train one with:  `lab pretrain tiny-gpt2`")
        st.stop()
    default = next((i for i, n in enumerate(names) if n in prefer), 0)
    return st.selectbox("Base", names, index=default, key=key)


def artifact_rows() -> list[dict]:
    """One row per artifact on disk (any kind): folder, kind, base, config hash (the home page's table). Crash
    leftovers are never listed (and are cleaned up); a folder whose manifest is unreadable is listed as broken
    (kind "broken", the reason in "problem"), and no picker offers it."""
    root = models_dir()
    rows = [{"artifact": folder.relative_to(root).as_posix(), "kind": m.get("kind"),
             "base": manifest_base_name(m), "config hash": m.get("config_hash"), "problem": ""}
            for folder, m in manifests(root)]
    rows += [{"artifact": folder.relative_to(root).as_posix(), "kind": "broken", "base": None, "config hash": None,
              "problem": why} for folder, why in broken_artifacts(root)]
    return sorted(rows, key=lambda r: r["artifact"])


def stop_if_none(arts, what: str, mech: str, base_name: str) -> None:
    """When `arts` is empty, stop the page with the command that trains `what` on the base."""
    if not arts:
        preset = "smoke" if base_name.startswith("smoke") else "tiny"
        st.warning(f"No {what} is trained on {base_name!r} yet. Train one with:  "
                   f"`lab train {mech} --base {base_name} --preset {preset}`")
        st.stop()


def export_buttons(fig, name: str, key: str) -> None:
    """Download buttons for a figure as PNG, SVG, PDF and HTML (rendered only when asked)."""
    with st.expander("Export figure"):
        fmt = st.radio("format", ["png", "svg", "pdf", "html"], horizontal=True, key=f"{key}-fmt")
        if st.button("Prepare file", key=f"{key}-prep"):
            try:
                st.session_state[f"{key}-bytes"] = (fmt, to_bytes(fig, fmt))
            except Exception as e:  # kaleido needs Chromium; say so instead of a traceback
                st.error(f"export failed: {e}. Figure export needs Chromium (apt-get install chromium).")
        got = st.session_state.get(f"{key}-bytes")
        if got:
            st.download_button(f"Download {name}.{got[0]}", got[1], file_name=f"{name}.{got[0]}", key=f"{key}-dl")


def show_error(e: Exception) -> None:
    """A LabError is the user's to fix: show its message, not a traceback."""
    if isinstance(e, LabError):
        st.error(str(e))
    else:
        raise e


# --- controls that tell the truth ----------------------------------------------------------------------

def disabled_reason(disabled: bool, reason: str) -> bool:
    """Under a control disabled in this state, one line saying why; returns `disabled` for the widget."""
    if disabled:
        st.caption(f"⛔ {reason}")
    return disabled


# --- generated text: side by side, differences highlighted ---------------------------------------------

MARK = "#ffd54f"
TEXT_STYLE = ("white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; font-size: 0.92rem; "
              "line-height: 1.7; padding: 0.6rem 0.8rem; border: 1px solid #ddd; border-radius: 0.4rem;")


def token_pieces(tokenizer, text: str) -> list[str]:
    """The text as the tokenizer splits it, one decoded string per token."""
    return [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]


def token_diff(a: Sequence[str], b: Sequence[str]) -> tuple[list[bool], list[bool]]:
    """Which tokens of `a` and of `b` lie outside their longest common blocks (difflib): the changed ones."""
    da, db = [True] * len(a), [True] * len(b)
    for blk in difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False).get_matching_blocks():
        for i in range(blk.size):
            da[blk.a + i] = False
            db[blk.b + i] = False
    return da, db


def tokens_html(tokens: Sequence[str], marked: Sequence[bool], prefix: str = "") -> str:
    """Wrapped text: the prefix (the prompt) grey, then the tokens, the marked ones highlighted."""
    out = [f'<span style="color:#888">{html.escape(prefix)}</span>'] if prefix else []
    for t, m in zip(tokens, marked):
        t = html.escape(t)
        out.append(f'<mark style="background:{MARK}; padding:0 1px">{t}</mark>' if m else t)
    return f'<div style="{TEXT_STYLE}">{"".join(out) or "<i>(nothing generated)</i>"}</div>'


def compare_outputs(label_a: str, tokens_a: Sequence[str], label_b: str, tokens_b: Sequence[str],
                    prefix: str = "") -> int:
    """Two continuations of the same prompt side by side, wrapped, with the tokens that differ highlighted.
    Returns how many tokens differ (both sides)."""
    da, db = token_diff(tokens_a, tokens_b)
    left, right = st.columns(2)
    for col, label, toks, marks in ((left, label_a, tokens_a, da), (right, label_b, tokens_b, db)):
        col.markdown(f"**{label}**")
        col.markdown(tokens_html(toks, marks, prefix), unsafe_allow_html=True)
    n = sum(da) + sum(db)
    st.caption("The two continuations are identical." if n == 0 else
               f"{sum(da)} of {len(tokens_a)} tokens on the left and {sum(db)} of {len(tokens_b)} on the right differ "
               f"(highlighted).")
    return n


def _diverging(v: float, vmax: float) -> str:
    """Teal for positive, coral for negative, white at 0 (saturating at |v| = vmax)."""
    a = max(-1.0, min(1.0, v / vmax)) if vmax > 0 else 0.0
    r, g, b = (47, 156, 143) if a >= 0 else (232, 122, 93)
    w = abs(a)
    return f"rgb({round(255 + (r - 255) * w)},{round(255 + (g - 255) * w)},{round(255 + (b - 255) * w)})"


def strip_html(tokens: Sequence[str], values: Sequence[float], unit: str = "nats", vmax: float | None = None) -> str:
    """Each token on a background coloured by its value (diverging around 0), the value on hover."""
    if len(tokens) != len(values):
        raise LabError(f"a strip needs one value per token, got {len(tokens)} tokens and {len(values)} values")
    vmax = vmax if vmax is not None else max([abs(float(v)) for v in values] + [1e-9])
    cells = [f'<span title="{html.escape(repr(t))}: {float(v):+.3f} {unit}" style="background:{_diverging(float(v), vmax)};'
             f' padding:2px 1px; border-right:1px solid #fff">{html.escape(t)}</span>' for t, v in zip(tokens, values)]
    return f'<div style="{TEXT_STYLE}">{"".join(cells) or "<i>(no tokens)</i>"}</div>'


def logprob_strip(label: str, tokens: Sequence[str], values: Sequence[float], unit: str = "nats") -> None:
    """A labelled coloured strip of per-token values with its scale."""
    vmax = max([abs(float(v)) for v in values] + [1e-9])
    st.markdown(f"**{label}**")
    st.markdown(strip_html(tokens, values, unit, vmax), unsafe_allow_html=True)
    st.caption(f"colour: teal = higher, coral = lower, saturating at ±{vmax:.3g} {unit}; hover a token for its value")


def prefix_scores(score: Callable[[list[str], list[str]], Sequence[float]], prompt: str,
                  pieces: Sequence[str]) -> list[float]:
    """log p(piece i | prompt + pieces before i) for every piece, in one call of `score(prompts, continuations)`
    (summed log p of each continuation, e.g. a ChannelModel's `continuation_logprobs`). The text before each piece
    is re-tokenised, as any typed prompt is."""
    if not pieces:
        return []
    prompts = [prompt + "".join(pieces[:i]) for i in range(len(pieces))]
    with torch.no_grad():
        return [float(v) for v in score(prompts, list(pieces))]


# --- the home page: artifacts per mechanism, the report with its figures -------------------------------

MECHANISM_OF_KIND = {"rlf": "Recursive Latent Forcing", "channels": "Proprioceptive channels",
                     "innerlink": "Inner link", "combiner": "Thinking combiner"}


def artifacts_per_mechanism(rows: list[dict]) -> dict[str, Counter]:
    """{mechanism: Counter(kind)} of `artifact_rows()` (broken artifacts under "broken")."""
    out: dict[str, Counter] = {}
    for r in rows:
        kind = r.get("kind") or "?"
        mech = "broken" if kind == "broken" else MECHANISM_OF_KIND.get(kind.split("-")[0], kind)
        out.setdefault(mech, Counter())[kind] += 1
    return out


IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")


def report_blocks(md: str, run_dir: Path) -> list[tuple[str, str | Path]]:
    """A report.md split into ("md", text) blocks and ("image", absolute path) for each `![k](rel.png)` line,
    so a page can render every figure with st.image (Streamlit cannot resolve the relative links)."""
    blocks: list[tuple[str, str | Path]] = []
    buf: list[str] = []
    for line in md.splitlines():
        m = IMAGE_LINE.match(line)
        if m:
            if buf:
                blocks.append(("md", "\n".join(buf)))
                buf = []
            blocks.append(("image", (Path(run_dir) / m.group(2)).resolve()))
        else:
            buf.append(line)
    if buf:
        blocks.append(("md", "\n".join(buf)))
    return blocks
