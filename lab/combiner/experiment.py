"""The thinking-combiner experiment: Config, build, train (features + two fits per k), evaluate (bpb)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lab import LabError, models_dir
from lab.combiner import bpb as B
from lab.combiner.combiner import Combiner
from lab.combiner.features import as_tensors, collect_features, split
from lab.combiner.fit import fit_ce, fit_ridge
from lab.combiner.thinking import FEEDS, check_k
from lab.configcheck import check_field_types
from lab.report import Published, Report
from lab.stats import Measure
from lab.store import Artifact, load_artifact, save_artifact

KIND = "combiner"
# the published values the report and the app page quote (PUBLISHED.md)
PUBLISHED_IDENTITY_DELTA = "0 (bit-exact)"
PUBLISHED_FITTED_DELTA = "-0.019 bpb (-0.0189)"
FITS = ("ce", "ridge")
CONTROL = "control"   # CE fit of alpha and beta only (M = 0): what recalibration alone buys
SOURCE = "parameter-golf thinking-combiner submission (PUBLISHED.md)"


@dataclass
class Config:
    base: str = "tiny-gpt2"          # base preset or HF model path
    k_max: int = 4                   # combiners are fitted for every k = 1..k_max latent steps
    feed: str = "final"              # thought input: the base's own final-normed state (see thinking.py)
    # features (training split of the lab corpus)
    n_features: int = 16384          # cached (h, T, next token) triples, as published
    ctx_min: int = 32                # context lengths drawn uniformly in [ctx_min, ctx_max]
    ctx_max: int = 120
    train_docs: int = 20000          # training documents the windows are drawn from
    feature_batch: int = 64
    val_fraction: float = 0.1        # of the features, for early numbers, ridge lambda and step length
    # cross-entropy fit (as published: AdamW lr 1e-3, batch 512, 80 steps)
    ce_steps: int = 80
    ce_batch: int = 512
    ce_lr: float = 1e-3
    ce_weight_decay: float = 0.01
    # ridge fit
    ridge_lambdas: tuple = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # relative to the mean diagonal of T^T T
    # evaluation on lab.corpus.heldout_text(eval_docs)
    eval_docs: int = 8000
    separator: str = "eos"           # between held-out documents: the base's EOS ("eos") or heldout_text's blank line ("text")
    chunk_len: int = 120             # chunked last-position evaluator; chunk_len + k_max <= trained context
    window: int = 128                # sliding-window evaluator (the base only)
    stride: int = 32
    sliding_max_tokens: int = 0      # 0: the whole held-out text; else its first N tokens
    check_tokens: int = 200          # sliding vs naive per-token recompute on this many tokens (0: skip)
    eval_batch: int = 32
    seed: int = 0

    def __post_init__(self):
        check_field_types(self)
        try:
            check_k(self.k_max)
        except LabError as e:
            raise LabError(f"k_max: {e}") from None
        if self.separator not in ("eos", "text"):
            raise LabError(f"separator must be 'eos' or 'text', got {self.separator!r}")
        if self.feed not in FEEDS:
            raise LabError(f"feed must be one of {FEEDS}, got {self.feed!r}")
        B.check_window(self.window, self.stride)
        if not 1 <= self.ctx_min <= self.ctx_max:
            raise LabError(f"need 1 <= ctx_min <= ctx_max, got {self.ctx_min}, {self.ctx_max}")
        self.ridge_lambdas = tuple(self.ridge_lambdas)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        presets = {
            "smoke": dict(base="smoke-gpt2", n_features=1024, ctx_min=16, ctx_max=48, train_docs=2000,
                          ce_steps=40, ce_batch=256, eval_docs=300, chunk_len=48, window=64, stride=16,
                          check_tokens=60, ridge_lambdas=(1e-2, 1e-1)),
            "tiny": dict(),
            "paper": dict(base="Qwen/Qwen2.5-0.5B", n_features=16384, ctx_min=512, ctx_max=2048, chunk_len=2048,
                          window=2048, stride=64, eval_docs=20000, feature_batch=8, eval_batch=4, check_tokens=0),
        }
        if name not in presets:
            raise LabError(f"unknown combiner preset {name!r}; presets are {', '.join(presets)}")
        known = {f.name for f in fields(cls)}
        bad = set(overrides) - known
        if bad:
            raise LabError(f"unknown Config fields {sorted(bad)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def artifact_dir(preset: str, base_name: str) -> Path:
    return models_dir() / f"combiner-{preset}-{Path(base_name).name}"


def build(config: Config, base) -> Combiner:
    """A zero-init (identity) combiner for this base (float32 parameters on any base dtype)."""
    return Combiner(base.d_model).to(base.device)


def _check_base_context(config: Config, base) -> None:
    base.check_length(max(config.ctx_max, config.chunk_len) + config.k_max)
    trained = (base.meta.get("preset") or {}).get("seq_len")
    if trained and max(config.ctx_max, config.chunk_len) + config.k_max > trained:
        raise LabError(f"context {max(config.ctx_max, config.chunk_len)} + {config.k_max} thoughts exceeds the "
                       f"{trained} positions {base.name!r} was trained on; lower ctx_max/chunk_len or k_max")


def train(config: Config, base, out_dir: Path | None = None, progress: bool = True) -> Artifact:
    """Cache features, then fit the combiner for every k in 1..k_max by cross-entropy and by ridge."""
    _check_base_context(config, base)
    out_dir = Path(out_dir) if out_dir else artifact_dir("custom", base.name)
    t0 = time.perf_counter()
    ds = collect_features(base, config.n_features, config.k_max, config.ctx_min, config.ctx_max, config.feed,
                          config.train_docs, config.seed, config.feature_batch, progress=progress)
    t_feat = time.perf_counter() - t0
    tensors, metrics = {}, {"feature_seconds": round(t_feat, 1), "n_features": len(ds), "fits": {}}
    for k in range(1, config.k_max + 1):
        tr, va = split(as_tensors(ds, k), config.val_fraction, config.seed)
        ckpt = out_dir.with_name(f".{out_dir.name}.ckpt") / f"k{k}"
        t1 = time.perf_counter()
        ce, info_ce = fit_ce(base, tr, va, config.ce_steps, config.ce_batch, config.ce_lr, config.ce_weight_decay,
                             config.seed, ckpt_dir=ckpt, desc=f"combiner ce k={k}")
        t2 = time.perf_counter()
        rg, info_rg = fit_ridge(base, tr, va, config.ridge_lambdas)
        t3 = time.perf_counter()
        tensors.update(ce.tensors(f"ce.k{k}."))
        tensors.update(rg.tensors(f"ridge.k{k}."))
        info_ce["seconds"], info_rg["seconds"] = round(t2 - t1, 2), round(t3 - t2, 2)
        metrics["fits"][f"k{k}"] = {"ce": info_ce, "ridge": info_rg}
    # the control: the same CE fit with M frozen at 0 (alpha and beta only; no thought is used)
    tr, va = split(as_tensors(ds, 1), config.val_fraction, config.seed)
    ctrl, info = fit_ce(base, tr, va, config.ce_steps, config.ce_batch, config.ce_lr, config.ce_weight_decay,
                        config.seed, ckpt_dir=out_dir.with_name(f".{out_dir.name}.ckpt") / "control",
                        desc="combiner control (no thought)", use_thought=False)
    tensors.update(ctrl.tensors(f"{CONTROL}."))
    metrics["fits"]["control"] = info
    art = save_artifact(out_dir, KIND, tensors, asdict(config), base, metrics)
    import shutil
    shutil.rmtree(out_dir.with_name(f".{out_dir.name}.ckpt"), ignore_errors=True)
    return art


def combiners(artifact: Artifact, base) -> dict[tuple[str, int], Combiner]:
    """{(fit, k): Combiner} from a trained artifact."""
    cfg = Config.from_dict(artifact.config)
    return {(fit, k): Combiner.from_tensors(artifact.tensors, f"{fit}.k{k}.", base.d_model).to(base.device)
            for fit in FITS for k in range(1, cfg.k_max + 1)}


def control_combiner(artifact: Artifact, base) -> Combiner:
    """The no-thought control (alpha, beta fitted, M = 0)."""
    return Combiner.from_tensors(artifact.tensors, f"{CONTROL}.", base.d_model).to(base.device)


def load(path: Path, base) -> Artifact:
    """A trained combiner artifact, verified against the base; a LabError if it lacks any fit."""
    art = load_artifact(path, KIND, base)
    k_max = Config.from_dict(art.config).k_max
    want = [f"{fit}.k{k}.M" for fit in FITS for k in range(1, k_max + 1)] + [f"{CONTROL}.M"]
    missing = [w for w in want if w not in art.tensors]
    fits = (art.manifest.get("metrics") or {}).get("fits") or {}
    missing += [f"metrics.fits.k{k}.{fit}.val_nats" for fit in FITS for k in range(1, k_max + 1)
                if not isinstance((fits.get(f"k{k}") or {}).get(fit), dict) or "val_nats" not in fits[f"k{k}"][fit]]
    if missing:
        raise LabError(f"{path} lacks the fits {missing[:4]} (made by an older version?); retrain it with "
                       f"`lab train combiner`")
    return art


def eval_features(config: Config, base, text: str | None = None, progress: bool = False):
    """(ids, bytes, ChunkFeatures) of the held-out text for the chunked evaluator (k_max thoughts)."""
    text = B.heldout_eval_text(config.eval_docs, config.separator, base.tokenizer) if text is None else text
    ids, nb = B.tokenize_with_bytes(base.tokenizer, text)
    feats = B.chunk_features(base, ids, nb, config.chunk_len, config.k_max, config.feed, config.eval_batch, progress)
    return ids, nb, feats


def delta_table(base, feats, combs: dict, k_max: int, seed: int = 0, alpha=None, m_scale: float = 1.0):
    """Base nats and, per (fit, k), the delta bpb Measure vs the base on the chunked positions."""
    base_nats = B.score_chunks(base, feats)
    out = {}
    for (fit, k), c in combs.items():
        nats = B.score_chunks(base, feats, c, k, alpha=alpha, m_scale=m_scale)
        out[(fit, k)] = (nats, B.delta_measure(f"delta bpb, {fit} combiner k={k} (chunked)", nats, base_nats,
                                               feats.nbytes, "base (chunked)", seed=seed))
    return base_nats, out


def evaluate(artifact: Artifact | Path, base, config: Config | None = None, progress: bool = True) -> Report:
    """bpb of base / identity / fitted combiners on held-out text; delta vs k; evaluator costs."""
    from lab import figures
    art = artifact if isinstance(artifact, Artifact) else load(Path(artifact), base)
    cfg = config or Config.from_dict(art.config)
    combs = combiners(art, base)
    rep = Report("Thinking combiner (one Coconut step, mixed linearly)")
    rep.provenance = {"base": base.name, "fingerprint": base.fingerprint[:12], "artifact": str(art.path),
                      "config_hash": art.manifest.get("config_hash"), "seed": cfg.seed, "feed": cfg.feed}
    t0 = time.perf_counter()
    ids, nb, feats = eval_features(cfg, base, progress=progress)
    t_chunk = time.perf_counter() - t0
    base_nats = B.score_chunks(base, feats)
    ident = Combiner(base.d_model).to(base.device)
    id_nats = B.score_chunks(base, feats, ident, 1)
    m_base = rep.add(B.bpb_measure("base bpb (chunked last-position)", base_nats, feats.nbytes, cfg.seed,
                                   chunk_len=cfg.chunk_len),
                     Published("base, chunked last-position bpb (their base, context only)", "2.13506", SOURCE))
    rep.add(B.delta_measure("delta bpb, identity combiner (chunked)", id_nats, base_nats, feats.nbytes,
                            "base (chunked)", seed=cfg.seed, bit_exact=bool(np.array_equal(id_nats, base_nats))),
            Published("identity delta (zero-init combiner)", PUBLISHED_IDENTITY_DELTA, SOURCE))
    _, deltas = delta_table(base, feats, combs, cfg.k_max, cfg.seed)
    for (fit, k), (nats, m) in deltas.items():
        m.extra.update(bpb=B.bpb(nats, feats.nbytes), val_nats=art.manifest["metrics"]["fits"][f"k{k}"][fit]["val_nats"])
        pub = Published("fitted delta before quantization (k=1, cross-entropy fit)", PUBLISHED_FITTED_DELTA, SOURCE) \
            if (fit, k) == ("ce", 1) else None
        rep.add(m, pub)
    ctrl_nats = B.score_chunks(base, feats, control_combiner(art, base), 1)
    rep.add(B.delta_measure("delta bpb, no-thought control (alpha, beta only; chunked)", ctrl_nats, base_nats,
                            feats.nbytes, "base (chunked)", seed=cfg.seed))
    rep.add(B.delta_measure("delta bpb, ce combiner k=1 vs no-thought control (what T_1 adds)", deltas[("ce", 1)][0],
                            ctrl_nats, feats.nbytes, "no-thought control (chunked)", seed=cfg.seed))
    # sliding window (the base), with the naive per-token check on a prefix
    sl_ids = ids if not cfg.sliding_max_tokens else ids[: cfg.sliding_max_tokens]
    sl_nb = nb if not cfg.sliding_max_tokens else nb[: cfg.sliding_max_tokens]
    t1 = time.perf_counter()
    sl = B.sliding_window(base, sl_ids, sl_nb, cfg.window, cfg.stride, batch=cfg.eval_batch, progress=progress)
    t_slide = time.perf_counter() - t1
    # every token is scored here: the CI resamples documents (with the EOS separator; else scored tokens)
    units = B.document_units(sl_ids, base.tokenizer.eos_token_id) if cfg.separator == "eos" else None
    rep.add(B.bpb_measure(f"base bpb (sliding window {cfg.window}, stride {cfg.stride})", sl.nats, sl.nbytes,
                          cfg.seed, units=units, window=cfg.window, stride=cfg.stride),
            Published("base, sliding window 2048 / stride 64 (their base, context only)", "1.26698", SOURCE))
    costs = [
        {"evaluator": f"sliding window {cfg.window}/{cfg.stride} (base)", **sl.cost(), "seconds": round(t_slide, 1)},
        {"evaluator": f"chunked last-position {cfg.chunk_len} (base, identity)", "scored_tokens": len(feats),
         "forwards": len(feats), **B.chunked_cost(feats, 0, False)},
    ] + [{"evaluator": f"chunked + combiner k={k}", "scored_tokens": len(feats), "forwards": (1 + k) * len(feats),
          **B.chunked_cost(feats, k, True)} for k in range(1, cfg.k_max + 1)]
    costs[1]["seconds_incl_thinking"] = round(t_chunk, 1)
    if cfg.check_tokens:
        n = min(cfg.check_tokens, len(ids))
        s_small = B.sliding_window(base, ids[:n], nb[:n], cfg.window, cfg.stride)
        naive = B.naive_recompute(base, ids[:n], nb[:n], B.context_starts(n, cfg.window, cfg.stride))
        costs.append({"evaluator": "naive per-token recompute (check)", **naive.cost()})
        rep.tables["sliding_vs_naive"] = [{"tokens": n, "max_abs_diff_nats": float(np.abs(s_small.nats - naive.nats).max()),
                                           "bpb_sliding": s_small.bpb, "bpb_naive": naive.bpb}]
    rep.tables["evaluator_cost"] = costs
    rows = []
    for (fit, k), (nats, m) in deltas.items():
        rows.append({"fit": fit, "k": k, "delta_bpb": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high,
                     "p": m.p_value, "bpb": m.extra["bpb"], "val_nats": m.extra["val_nats"]})
    rep.tables["delta_vs_k"] = rows
    fig = figures.line(list(range(1, cfg.k_max + 1)),
                       {fit: [deltas[(fit, k)][1].value for k in range(1, cfg.k_max + 1)] for fit in FITS},
                       f"Delta bpb vs latent steps k ({base.name}, n={len(feats)} chunked positions)",
                       "latent steps k", "delta bits per byte (combiner - base)",
                       error={fit: ([deltas[(fit, k)][1].ci_low for k in range(1, cfg.k_max + 1)],
                                    [deltas[(fit, k)][1].ci_high for k in range(1, cfg.k_max + 1)]) for fit in FITS})
    fig.add_hline(y=0, line_dash="dot", line_color="#444")
    fig.update_xaxes(dtick=1)
    rep.figures["delta_vs_k"] = fig
    names, vals, lo, hi = [], [], [], []
    for label, nats in [("base", base_nats), ("identity", id_nats), ("no-thought control", ctrl_nats)] + \
            [(f"{fit} combiner k=1", deltas[(fit, 1)][0]) for fit in FITS]:
        mm = B.bpb_measure(label, nats, feats.nbytes, cfg.seed)
        names.append(label), vals.append(mm.value), lo.append(mm.ci_low), hi.append(mm.ci_high)
    rep.figures["bpb_arms"] = figures.bars_with_ci(names, vals, lo, hi, "Chunked last-position bpb", "bits per byte")
    rep.notes += [
        f"Chunked evaluator: {len(feats)} positions (the token after each non-overlapping {cfg.chunk_len}-token "
        f"chunk of the {cfg.eval_docs} documents of lab.corpus.heldout_text({cfg.eval_docs}), joined by "
        f"{'the EOS token as in pretraining' if cfg.separator == 'eos' else 'blank lines (heldout_text verbatim)'}); "
        f"fits use the training split only.",
        "Identity and base are both head(h) on the same final-normed h: their per-token losses are compared "
        "bit for bit (max |delta| is in the identity measure's extra).",
        "CIs: paired percentile bootstrap of sum(bits) / sum(bytes), resampling units (held-out documents for the "
        "sliding window when documents are EOS-separated, else scored positions), so the byte count varies with the "
        "resample; p: paired sign-flip permutation test of the units' summed bit differences.",
        f"The published figures come from a 512-d base on FineWeb with 2048-token chunks; this lab's base is "
        f"{base.name} (d={base.d_model}) on the lab corpus: compare signs and orders, not values.",
    ]
    return rep


def train_or_load(cfg: Config, base, preset: str):
    """The preset's artifact for exactly this config on this base: loaded when on disk, else (another base
    fingerprint, an older format, another config such as another seed) trained and saved in its place."""
    path = artifact_dir(preset, cfg.base)
    art = None
    if (path / "manifest.json").exists():
        try:
            art = load(path, base)
        except LabError:  # another base fingerprint or an older format: retrain
            art = None
        if art is not None and Config.from_dict(art.config) != cfg:
            art = None  # another config (e.g. another seed): retrain
    return art if art is not None else train(cfg, base, out_dir=path)


def reproduce_section(preset: str, seed: int, out_dir: Path) -> Report:
    """Train what is missing for this preset (features + fits), then evaluate; writes report.json/md."""
    from lab.pretrain import ensure_base
    cfg = Config.preset(preset, seed=seed)
    base = ensure_base(cfg.base)
    art = train_or_load(cfg, base, preset)
    rep = evaluate(art, base, cfg)
    if out_dir is not None:
        rep.save(Path(out_dir), formats=())
    return rep


# --- live analysis helpers (the app and the notebook call these) ---------------------------------------

def delta_at(base, feats, comb: Combiner, k: int, alpha: float | None = None, m_scale: float = 1.0,
             seed: int = 0, base_nats: np.ndarray | None = None) -> tuple[Measure, np.ndarray]:
    """Delta bpb of one combiner (with the app's alpha / M-scale knobs) vs the base on chunk features."""
    base_nats = B.score_chunks(base, feats) if base_nats is None else base_nats
    nats = B.score_chunks(base, feats, comb, k, alpha=alpha, m_scale=m_scale)
    return B.delta_measure(f"delta bpb (k={k}, alpha={'fitted' if alpha is None else f'{alpha:.3g}'}, "
                           f"M-scale={m_scale:.3g})", nats, base_nats, feats.nbytes, "base (chunked)", seed=seed), nats


@torch.no_grad()
def per_token_gains(base, comb: Combiner, text: str, k: int = 1, feed: str = "final", alpha: float | None = None,
                    m_scale: float = 1.0) -> list[dict]:
    """For each token of `text` after the first: its base loss, the combiner's loss (the thought seeing
    only the prefix) and the gain in bits (positive = the combiner predicts it better)."""
    from lab.combiner.thinking import think_every_position
    ids, nb = B.tokenize_with_bytes(base.tokenizer, text)
    x = torch.from_numpy(ids).to(base.device)
    hs, T = think_every_position(base, x, k, feed)
    y = x[1:]
    feats = {"h": hs[:-1], "t": T[:-1, k - 1], "y": y}
    from lab.combiner.fit import ce_nats
    b_n = ce_nats(base, None, feats).numpy()
    c_n = ce_nats(base, comb, feats, alpha=alpha, m_scale=m_scale).numpy()
    toks = [base.tokenizer.decode([int(t)]) for t in ids[1:]]
    return [{"pos": i + 1, "token": tok, "bytes": int(nb[i + 1]), "base_bits": float(b_n[i] / B.LN2),
             "combiner_bits": float(c_n[i] / B.LN2), "gain_bits": float((b_n[i] - c_n[i]) / B.LN2)}
            for i, tok in enumerate(toks)]


def gains_figure(rows: list[dict], title: str):
    import plotly.graph_objects as go
    from lab import figures
    fig = go.Figure(go.Bar(x=[f"{r['pos']}:{r['token']!r}" for r in rows], y=[r["gain_bits"] for r in rows],
                           marker_color=["#2f9c8f" if r["gain_bits"] >= 0 else "#e87a5d" for r in rows],
                           hovertext=[f"base {r['base_bits']:.2f} bits, combiner {r['combiner_bits']:.2f} bits"
                                      for r in rows]))
    fig.update_layout(xaxis_title="token (position: text)", yaxis_title="gain in bits (base - combiner)")
    return figures.style(fig, title)


M_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the M-scale sweep of the app and notebook 04


def scale_sweep(base, feats, comb: Combiner, k: int, scales=M_SCALES, alpha: float | None = None, seed: int = 0,
                base_nats: np.ndarray | None = None):
    """Delta bpb (with CI) against the M-scale knob, for the figure beside the sliders."""
    base_nats = B.score_chunks(base, feats) if base_nats is None else base_nats
    return [delta_at(base, feats, comb, k, alpha, float(s), seed, base_nats)[0] for s in scales]


def scale_sweep_figure(sweep, scales=M_SCALES, label: str = "", at: float | None = None):
    """Delta bpb with its CI against M-scale (`scale_sweep`'s measures); `at` marks the current setting."""
    from lab import figures
    fig = figures.line(list(scales), {"Δ bpb": [m.value for m in sweep]}, f"Δ bpb vs M-scale{f' ({label})' if label else ''}",
                       "M-scale", "Δ bits per byte", error={"Δ bpb": ([m.ci_low for m in sweep], [m.ci_high for m in sweep])})
    if at is not None:
        fig.add_vline(x=at, line_dash="dot")
    return fig


def find_artifacts(base_name: str) -> list[Path]:
    """Trained combiner artifacts on disk for this base, newest first (`lab.store.find_artifacts`: by kind,
    and a folder with an unreadable manifest is skipped rather than breaking the listing)."""
    from lab.store import find_artifacts as find_kind
    return sorted(find_kind(KIND, base_name).values(), key=lambda p: p.stat().st_mtime, reverse=True)


@torch.no_grad()
def thought_lens(base, text: str, k: int = 4, top: int = 5, feed: str = "final") -> list[dict]:
    """What h and each thought T_j would predict through the frozen head (a logit lens on the thoughts),
    with the cosine of each to h: how far a thought moves from the state it came from."""
    from lab.combiner.thinking import think
    ids, _ = base.encode(text)
    th = think(base, ids, k, feed=feed)
    rows = []
    for name, v in [("h", th.h[0])] + [(f"T_{j + 1}", th.T[0, j]) for j in range(k)]:
        p = torch.softmax(base.logits(v, normed=True).float(), -1)
        pv, pi = p.topk(top)
        rows.append({"state": name, "cos_to_h": float(torch.nn.functional.cosine_similarity(v.float(), th.h[0].float(), 0)),
                     "norm": float(v.float().norm()),
                     "top_tokens": ", ".join(f"{base.tokenizer.decode([int(i)])!r} {float(q):.2f}" for q, i in zip(pv, pi))})
    return rows
