"""Residual capture cost: lab.hooks.capture vs a bare forward vs output_hidden_states, and
TransformerLens run_with_cache on the same GPT-2 shape (if transformer_lens is installed).

Ratios are measured side by side in one process, each timing the median of repeated runs."""

from __future__ import annotations

import os
import sys

import torch
from torch.utils import benchmark

from lab import hooks
from lab.pretrain import ensure_base


def _median(stmt, globals_, min_run_time=1.0) -> float:
    return benchmark.Timer(stmt=stmt, globals=globals_).blocked_autorange(min_run_time=min_run_time).median


def main(base_name: str | None = None, batch: int = 8, seq: int = 128) -> dict:
    base_name = base_name or os.environ.get("LAB_BENCH_BASE", "tiny-gpt2")
    base = ensure_base(base_name)
    torch.manual_seed(0)
    ids = torch.randint(0, len(base.tokenizer), (batch, seq))
    g = {"base": base, "ids": ids, "hooks": hooks, "torch": torch}
    with torch.no_grad():
        bare = _median("base.model(input_ids=ids)", g)
        ohs = _median("base.model(input_ids=ids, output_hidden_states=True)", g)
        cap = _median("with hooks.capture(base) as c: base.model(input_ids=ids)", g)
    out = {
        "base": base_name, "shape": f"B={batch} T={seq}",
        "bare_forward_ms": bare * 1e3,
        "capture_vs_bare": cap / bare,
        "capture_vs_output_hidden_states": cap / ohs,
    }
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        out["transformer_lens"] = "not installed (pip install transformer-lens)"
        return out
    # TransformerLens 4 wraps the very same HF model (no download), so the ratios compare hook
    # machinery on identical weights and shapes.
    import copy
    tl = TransformerBridge.boot_transformers(str(base.path), hf_model=copy.deepcopy(base.model),
                                             tokenizer=base.tokenizer, device="cpu")
    tl.eval()
    g.update(tl=tl)
    with torch.no_grad():
        tl_bare = _median("tl(ids)", g)
        tl_cache = _median("tl.run_with_cache(ids, names_filter=lambda n: 'resid' in n)", g)
    out.update({"tl_run_with_cache_vs_tl_forward": tl_cache / tl_bare,
                "tl_run_with_cache_vs_hf_bare": tl_cache / bare,
                "lab_capture_vs_tl_run_with_cache": cap / tl_cache})
    return out


def time_pretrain(names=("tiny-gpt2", "tiny-mamba2")) -> dict:
    """Wall time of `lab pretrain NAME` from scratch in a fresh LAB_HOME (tokenizer and corpus
    included), with the held-out loss it reaches beside the unigram baseline."""
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from lab.store import read_json
    out = {}
    for name in names:
        home = tempfile.mkdtemp(prefix="lab-pretrain-bench-")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lab", "pretrain", name], check=True,
                       env={**os.environ, "LAB_HOME": home}, stderr=subprocess.DEVNULL)
        meta = read_json(Path(home) / "models" / name / "lab_base.json")
        out[f"{name}_pretrain_seconds"] = time.perf_counter() - t
        out[f"{name}_heldout_loss"] = meta["heldout_loss"]
        out[f"{name}_unigram_loss"] = meta["unigram_loss"]
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    result = main(*(args[:1] or [None]))
    if "--pretrain" in sys.argv:
        result.update(time_pretrain())
    for k, v in result.items():
        print(f"{k:36} {v:.3f}" if isinstance(v, float) else f"{k:36} {v}")
