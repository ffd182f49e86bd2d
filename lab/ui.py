"""Small Streamlit helpers shared by the app pages (display only; computation stays in lab/)."""

from __future__ import annotations

import streamlit as st

from lab import LabError, models_dir
from lab.bases import list_bases, load_base
from lab.figures import to_bytes
from lab.store import broken_artifacts, manifest_base_name, manifests
from lab.store import find_artifacts as artifacts  # noqa: F401  (the pages' artifact pickers)


@st.cache_resource(show_spinner="loading base…")
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
