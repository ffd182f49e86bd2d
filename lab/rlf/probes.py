"""Probes of a trained RLF model that read exactly the states training produced (`loop.{k}.latent`).

(a) trajectories: the answer-position latent after each loop, projected by PCA and UMAP, coloured by
    loop index and by solver state (pointer step / value / HALT), with the lifeline-off latents
    projected through the same fitted map; a logistic-regression probe of solver state, evaluated on
    held-out problems (split by problem, not by loop) against a shuffled-label control.
(b) gate partition: the gate's histogram; the published threshold rule (RAM > 1.01, ALU < 0.97) and a
    null-calibrated rule whose thresholds are quantiles of the gates of control runs (shuffled
    supervision, other seeds), with RAM / ALU fractions beside the null's own fractions.
(c) causal gate ablation: scale the RAM and the ALU dimensions of the lifeline separately (and a
    random set of other dimensions with the same summed |gate|, as a control) and measure pointer, value and HALT accuracy per loop.
(d) attribution: captum `LayerIntegratedGradients` on the base's input embedding, from loop k's logit
    of its target to every prompt token, as a loop-by-token heatmap; and a test of whether each loop's
    most-attributed token lies in the assignment that loop dereferences (vs the chance rate).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from scipy.stats import binomtest, fisher_exact, hypergeom
from scipy.stats import t as t_dist
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lab import LabError
from lab.figures import LAB_COLORS, add_published, style
from lab.hooks import ActivationCache
from lab.report import Published, Report
from lab.rlf.config import check_comparable
from lab.rlf.data import Problem
from lab.rlf.model import RLF, Lifeline, encode_prompts
from lab.stats import Measure, compare_proportions, null_quantiles, proportion, wilson_ci

STATES = ("pointer", "value", "halt")
PUBLISHED_RAM, PUBLISHED_ALU = 1.01, 0.97


# --- (a) trajectories --------------------------------------------------------------------------------

@dataclass
class Latents:
    X: np.ndarray          # (N_rows, d) answer-position latent after loop k
    loop: np.ndarray       # (N_rows,) k
    state: np.ndarray      # (N_rows,) index into STATES: the solver state loop k must output
    problem: np.ndarray    # (N_rows,) which problem
    hops: np.ndarray       # (N_rows,)
    correct: np.ndarray    # (N_rows,) loop k's greedy prediction equals its target


@torch.no_grad()
def collect_latents(model: RLF, problems: list[Problem], lifeline: Lifeline | None = None, site: str = "latent",
                    extra_loops: int = 0, batch_size: int = 128) -> Latents:
    """Loops 0..hops(+extra_loops) of every problem (teacher-free: the model's own loop states)."""
    X, loop, state, prob, hops, correct = [], [], [], [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i: i + batch_size]
        K = max(p.hops for p in chunk) + 1 + extra_loops
        ids, mask = encode_prompts(model.base, [p.prompt for p in chunk])
        cache = ActivationCache()
        logits = model.run(ids, mask, K, lifeline=lifeline, cache=cache)          # (K, B, V)
        lat = cache.stack(site, prefix="loop").float().cpu().numpy()              # (K, B, d)
        pred = logits.argmax(-1).cpu().numpy()
        tgt = model.vocab.targets(chunk, K).numpy()                               # (B, K)
        for b, p in enumerate(chunk):
            for k in range(p.hops + 1 + extra_loops):
                X.append(lat[k, b])
                loop.append(k)
                state.append(0 if k < p.hops - 1 else (1 if k == p.hops - 1 else 2))
                prob.append(i + b)
                hops.append(p.hops)
                correct.append(pred[k, b] == tgt[b, k])
    return Latents(np.stack(X), np.array(loop), np.array(state), np.array(prob), np.array(hops), np.array(correct))


def _umap(n_neighbors: int, seed: int):
    os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/lab-numba-cache")
    import umap  # noqa: PLC0415  (lazy: its import and first fit JIT-compile with numba)
    return umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, min_dist=0.2)


def trajectories(model: RLF, problems: list[Problem], method: str = "pca", seed: int = 0,
                 overlay_off: bool = True) -> dict:
    """Project answer-position latents (lifeline on; optionally off through the same map).
    Returns {"on": Latents, "off": Latents|None, "xy_on", "xy_off", "explained": PCA ratio or None}."""
    if method not in ("pca", "umap"):
        raise LabError(f"projection method must be 'pca' or 'umap', got {method!r}")
    on = collect_latents(model, problems)
    off = collect_latents(model, problems, Lifeline(mode="zero")) if overlay_off else None
    explained = None
    if method == "pca":
        proj = PCA(n_components=2, random_state=seed).fit(on.X)
        explained = proj.explained_variance_ratio_
    else:
        if len(on.X) < 10:
            raise LabError(f"UMAP needs at least 10 latents, got {len(on.X)}")
        proj = _umap(min(15, len(on.X) - 1), seed).fit(on.X)
    xy_on = proj.transform(on.X)
    xy_off = proj.transform(off.X) if off is not None else None
    return {"on": on, "off": off, "xy_on": xy_on, "xy_off": xy_off, "explained": explained, "method": method}


def pca_variance_measure(lat: Latents) -> Measure:
    """Share of variance in the first 2 PCs of the latents, with a delete-one-problem jackknife t interval: a
    bootstrap resample repeats problems, which alone raises the top-2 share (its percentile interval sat above
    the estimate), and the jackknife never duplicates a problem."""
    probs = np.unique(lat.problem)
    if len(probs) < 3:
        raise LabError(f"the PCA variance share needs latents of at least 3 problems, got {len(probs)}")
    rows_of = [np.flatnonzero(lat.problem == p) for p in probs]

    def share(keep):
        X = lat.X[np.concatenate([rows_of[i] for i in keep])]
        return float(PCA(n_components=2).fit(X).explained_variance_ratio_.sum())
    n = len(probs)
    v = share(range(n))
    loo = np.array([share([j for j in range(n) if j != i]) for i in range(n)])
    se = float(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))
    half = float(t_dist.ppf(0.975, n - 1)) * se
    return Measure("variance in 2 PCA components (answer-position latents)", v, n, v - half, v + half,
                   "jackknife over problems (t interval)", extra={"rows": int(len(lat.X)), "jackknife_se": se})


def trajectory_figure(traj: dict, colour: str = "loop", title: str | None = None):
    """Scatter of projected latents coloured by loop index or solver state; lifeline-off as open markers."""
    if colour not in ("loop", "state"):
        raise LabError(f"colour must be 'loop' or 'state', got {colour!r}")
    fig = go.Figure()
    for which, xy, lat, symbol in (("on", traj["xy_on"], traj["on"], "circle"),
                                   ("off", traj["xy_off"], traj["off"], "circle-open")):
        if xy is None:
            continue
        groups = sorted(set(lat.loop.tolist())) if colour == "loop" else range(len(STATES))
        for g in groups:
            sel = (lat.loop == g) if colour == "loop" else (lat.state == g)
            if not sel.any():
                continue
            name = (f"loop {g}" if colour == "loop" else STATES[g]) + (" (lifeline off)" if which == "off" else "")
            fig.add_trace(go.Scatter(x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=name,
                                     legendgroup=str(g), marker=dict(symbol=symbol, size=5 if which == "on" else 6,
                                     color=LAB_COLORS[g % len(LAB_COLORS)], opacity=0.7 if which == "on" else 0.5)))
    m = traj["method"].upper()
    fig.update_layout(xaxis_title=f"{m} 1", yaxis_title=f"{m} 2")
    return style(fig, title or f"RLF latent trajectories ({m}), coloured by {colour}; open: lifeline zeroed")


def state_probe(lat: Latents, seed: int = 0, test_frac: float = 0.3) -> dict:
    """Logistic-regression probe of solver state (pointer / value / HALT) from the latent, trained and
    tested on disjoint problems; control: the same probe fitted on shuffled labels."""
    probs = np.unique(lat.problem)
    if len(probs) < 4:
        raise LabError(f"the state probe needs at least 4 problems, got {len(probs)}")
    rng = np.random.default_rng(seed)
    test_p = rng.choice(probs, max(1, int(len(probs) * test_frac)), replace=False)
    te = np.isin(lat.problem, test_p)
    tr = ~te

    def fit_score(y_train):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        if len(set(y_train.tolist())) < 2:
            return np.zeros(te.sum(), dtype=bool)
        clf.fit(lat.X[tr], y_train)
        return clf.predict(lat.X[te]) == lat.state[te]

    hits = fit_score(lat.state[tr])
    ctrl = fit_score(rng.permutation(lat.state[tr]))
    m = compare_proportions("linear probe of solver state, held-out problems", hits, ctrl, "probe on shuffled labels")
    majority = np.bincount(lat.state[tr]).argmax()
    m.extra["majority_class_rate"] = float((lat.state[te] == majority).mean())
    m.extra["n_train_rows"] = int(tr.sum())
    return {"measure": m, "test_rows": int(te.sum())}


# --- (b) gate partition ------------------------------------------------------------------------------

def gate_values(model: RLF) -> np.ndarray:
    return model.gate.detach().float().cpu().numpy()


def partition(gate: np.ndarray, ram_thr: float, alu_thr: float) -> dict[str, np.ndarray]:
    return {"ram": np.flatnonzero(gate > ram_thr), "alu": np.flatnonzero(gate < alu_thr)}


def gate_partition(model: RLF, null_models: list[RLF] | None = None, q: float = 0.005) -> dict:
    """Published thresholds and null-calibrated thresholds (quantiles q, 1-q of the control runs'
    gates). With 2+ control runs the thresholds come from all but the last, and the null fraction is
    measured on the last (out of sample); with one, on itself (in sample: ~q by construction)."""
    g = gate_values(model)
    d = len(g)
    out = {"gate": g, "published": partition(g, PUBLISHED_RAM, PUBLISHED_ALU), "measures": []}
    pub = out["published"]
    out["measures"] += [proportion("RAM fraction (published rule: gate > 1.01)", np.isin(np.arange(d), pub["ram"])),
                        proportion("ALU fraction (published rule: gate < 0.97)", np.isin(np.arange(d), pub["alu"]))]
    if null_models:
        for m in null_models:
            check_comparable(model.config, m.config, "control run")
        nulls = [gate_values(m) for m in null_models]
        calib = np.concatenate(nulls[:-1]) if len(nulls) > 1 else nulls[0]
        held = nulls[-1]
        lo, hi = null_quantiles(calib, q, 1 - q)
        out["null_thresholds"] = (lo, hi)
        out["null_gates"] = np.concatenate(nulls)
        out["null"] = partition(g, hi, lo)
        null_part = partition(held, hi, lo)
        pub_null = partition(held, PUBLISHED_RAM, PUBLISHED_ALU)
        idx = np.arange(d)
        for label, part, npart in (("null-calibrated", out["null"], null_part), ("published", pub, pub_null)):
            for key in ("ram", "alu"):
                ours = np.isin(idx, part[key])
                theirs = np.isin(np.arange(len(held)), npart[key])
                m = proportion(f"{key.upper()} fraction ({label} rule)" + (f": gate {'>' if key == 'ram' else '<'} "
                               f"{hi if key == 'ram' else lo:.4f}" if label == "null-calibrated" else ""), ours)
                m.control, m.control_value = "same rule on a control run's gates", float(theirs.mean())
                m.p_value = float(fisher_exact([[ours.sum(), (~ours).sum()], [theirs.sum(), (~theirs).sum()]])[1])
                m.test = "Fisher exact vs control gates"
                m.extra["in_sample_null"] = len(nulls) == 1
                out["measures"].append(m)
    return out


def ram_overlap(models: list[RLF]) -> list[Measure]:
    """Whether the same dimensions become RAM (published rule: gate > 1.01) across training seeds: per pair of seeds,
    the share of the smaller RAM set that the other shares, against the overlap two random sets of those sizes have
    by chance (one-sided hypergeometric p). The frozen base fixes the basis, so reproducible RAM dimensions would
    be evidence of a functional partition; seed-specific ones would not."""
    out = []
    sets = [(m.config.seed, set(partition(gate_values(m), PUBLISHED_RAM, PUBLISHED_ALU)["ram"].tolist())) for m in models]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            (si, a), (sj, b) = sets[i], sets[j]
            d, k = len(gate_values(models[i])), min(len(a), len(b))
            if k == 0:
                continue
            shared = len(a & b)
            lo, hi = wilson_ci(shared, k)
            m = Measure(f"RAM dims (gate > 1.01) shared by method seeds {si} and {sj} (share of the smaller set)",
                        shared / k, k, lo, hi, "Wilson", control="two random sets of these sizes (chance)",
                        control_value=len(a) * len(b) / d / k,
                        p_value=float(hypergeom.sf(shared - 1, d, len(a), len(b))),
                        test="hypergeometric (one-sided, more overlap than chance)")
            m.extra.update(seeds=[si, sj], sizes=[len(a), len(b)], shared=shared)
            out.append(m)
    return out


def gate_histogram(part: dict, title: str = "RLF lifeline gate, coloured by partition"):
    g = part["gate"]
    rule = part.get("null", part["published"])
    lab = np.full(len(g), "other", dtype=object)
    lab[rule["ram"]] = "RAM"
    lab[rule["alu"]] = "ALU"
    fig = go.Figure()
    bins = dict(start=float(min(g.min(), 0.9)) - 1e-3, end=float(max(g.max(), 1.1)) + 1e-3,
                size=float(max(g.max(), 1.1) - min(g.min(), 0.9)) / 60)
    for name, color in (("other", LAB_COLORS[5]), ("RAM", LAB_COLORS[0]), ("ALU", LAB_COLORS[1])):
        sel = lab == name
        fig.add_trace(go.Histogram(x=g[sel], name=f"{name} ({int(sel.sum())})", marker_color=color, xbins=bins))
    if "null_gates" in part:
        fig.add_trace(go.Histogram(x=part["null_gates"], name="control-run gates (null)", xbins=bins,
                                   marker_color="rgba(0,0,0,0)", marker_line=dict(color="#333", width=1),
                                   histnorm="", opacity=0.6))
    add_published(fig, f"RAM threshold gate > {PUBLISHED_RAM}", x=PUBLISHED_RAM, source="GPT-2 run")
    add_published(fig, f"ALU threshold gate < {PUBLISHED_ALU}", x=PUBLISHED_ALU, source="GPT-2 run")
    if "null_thresholds" in part:
        for x in part["null_thresholds"]:
            fig.add_vline(x=x, line_dash="dash", line_color="#c2417b", annotation_text="null")
    fig.update_layout(barmode="overlay", xaxis_title="gate value", yaxis_title="dimensions")
    return style(fig, title)


# --- (c) causal gate ablation ------------------------------------------------------------------------

@torch.no_grad()
def step_accuracy(model: RLF, problems: list[Problem], lifeline: Lifeline | None = None) -> dict[str, np.ndarray]:
    """Per (problem, loop) correctness split by solver state: pointer, value, halt (teacher-free)."""
    lat = collect_latents(model, problems, lifeline)
    return {s: lat.correct[lat.state == i] for i, s in enumerate(STATES)}


def mass_matched_dims(gate: np.ndarray, dims: list[int], rng: np.random.Generator) -> list[int]:
    """A random set of other dimensions whose summed |gate| (the gate mass a scaling removes or adds) matches that
    of `dims`: dimensions outside `dims` in random order, taken while the sum stays closest to the target. Why:
    RAM dimensions are the largest gates, so as many random dimensions would remove less and flatter the partition."""
    target = float(np.abs(gate[dims]).sum())
    rest = np.setdiff1d(np.arange(len(gate)), dims)
    out, total = [], 0.0
    for i in rng.permutation(rest):
        g = float(abs(gate[i]))
        if abs(total + g - target) >= abs(total - target) and out:
            continue
        out.append(int(i))
        total += g
        if total >= target:
            break
    return sorted(out)


def gate_ablation(model: RLF, problems: list[Problem], part: dict[str, np.ndarray], scales=(0.0, 2.0),
                  seed: int = 0, rule: str = "") -> list[Measure]:
    """Scale the RAM dims, the ALU dims, or random dims of the same summed |gate| (`mass_matched_dims`), and compare pointer / value / HALT
    accuracy with the unablated model on the same problems and loops (exact McNemar); then the partition
    arm against the random arm on the same loops (does the partition matter more than any dims of its size?).
    rule names the partition in the measure names ("published rule", "null-calibrated rule")."""
    base = step_accuracy(model, problems)
    gate = gate_values(model)
    rng = np.random.default_rng(seed)
    tag = f" ({rule})" if rule else ""
    out = []
    for key in ("ram", "alu"):
        dims = [int(i) for i in part[key]]
        if not dims:
            continue
        rand = mass_matched_dims(gate, dims, rng)
        rand_label = f"random {len(rand)} dims (same gate mass)"
        for s in scales:
            arms = {key.upper(): step_accuracy(model, problems, Lifeline(ram_dims=dims, ram_scale=s) if key == "ram"
                                               else Lifeline(alu_dims=dims, alu_scale=s)),
                    rand_label: step_accuracy(model, problems, Lifeline(ram_dims=rand, ram_scale=s))}
            for label, acc in arms.items():
                for st in STATES:
                    if len(acc[st]) == 0:
                        continue
                    m = compare_proportions(f"{st} accuracy, {label}{tag} x{s:g}"
                                            + (f" (control for {key.upper()})" if label == rand_label else ""),
                                            acc[st], base[st], "unablated")
                    m.extra.update({"dims": key, "scale": s, "control": label == rand_label, "rule": rule})
                    out.append(m)
            for st in STATES:
                if len(arms[rand_label][st]):
                    m = compare_proportions(f"{st} accuracy, {key.upper()}{tag} x{s:g} vs {rand_label} x{s:g}",
                                            arms[key.upper()][st], arms[rand_label][st], f"{rand_label} x{s:g}")
                    m.extra.update({"dims": key, "scale": s, "control": False, "rule": rule, "vs_random": True})
                    out.append(m)
    return out


def partition_ablations(model: RLF, problems: list[Problem], part: dict, scales=(0.0, 2.0),
                        seed: int = 0) -> tuple[list[Measure], list[str]]:
    """`gate_ablation` on the published partition always (it is the claim under test) and on the
    null-calibrated one when it selects any dimension. Returns (measures, notes on rules that select nothing)."""
    measures, notes = [], []
    for rule, key in (("published rule", "published"), ("null-calibrated rule", "null")):
        if key in part and (len(part[key]["ram"]) or len(part[key]["alu"])):
            measures += gate_ablation(model, problems, part[key], scales, seed, rule)
        elif key in part:
            notes.append(f"gate ablation ({rule}): the rule selects no dimension, nothing to ablate")
    return measures, notes


# --- (d) attribution ---------------------------------------------------------------------------------

def _token_spans(model: RLF, prompt: str) -> tuple[list[str], list[tuple[int, int, str, str]]]:
    """Tokens of the prompt and, per assignment sentence, its (start, end) token span, lhs, rhs."""
    tok = model.base.tokenizer
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    toks = [tok.decode([i]) for i in enc["input_ids"]]
    spans, pos = [], 0
    body = prompt[: prompt.rfind("What is ")]
    for sent in body.split("."):
        if "=" not in sent:
            pos += len(sent) + 1
            continue
        a, b = pos + len(sent) - len(sent.lstrip()), pos + len(sent) + 1  # include the '.'
        lhs, rhs = (x.strip() for x in sent.split("=", 1))
        ti = [i for i, (s, e) in enumerate(offs) if s < b and e > a]
        spans.append((min(ti), max(ti) + 1, lhs, rhs))
        pos += len(sent) + 1
    return toks, spans


def attribute(model: RLF, problem: Problem, n_steps: int = 16) -> dict:
    """Integrated gradients (captum LayerIntegratedGradients on the base's input embedding) of loop k's
    target logit, for k = 0..hops, to each prompt token: a (K, T) matrix, baseline = PAD embeddings."""
    from captum.attr import LayerIntegratedGradients  # noqa: PLC0415  (lazy: captum is only needed for attribution)

    ids, mask = encode_prompts(model.base, [problem.prompt])
    K = problem.hops + 1
    targets = model.vocab.targets([problem], K)[0]
    pad = model.base.tokenizer.pad_token_id or 0

    def fwd(input_ids, attn, k):
        x0 = model.encode(input_ids, attn, grad=True)
        return model.run(input_ids, attn, k + 1, x0=x0, detach_prompt=False)[k]     # (B, V)

    lig = LayerIntegratedGradients(fwd, model.base.embed)
    rows = []
    for k in range(K):
        attr = lig.attribute(ids, baselines=torch.full_like(ids, pad), target=int(targets[k]),
                             additional_forward_args=(mask, k), n_steps=n_steps, internal_batch_size=n_steps)
        rows.append(attr.sum(-1)[0].detach().float().cpu().numpy())                    # (T,)
    toks, spans = _token_spans(model, problem.prompt)
    return {"attr": np.stack(rows), "tokens": toks, "spans": spans, "targets": [model.vocab.decode(int(t)) for t in targets]}


def attribution_test(model: RLF, problems: list[Problem], n_steps: int = 16) -> dict:
    """For loops 0..hops-1: is the most-attributed prompt token inside the assignment this loop
    dereferences ("cur = next")? Hit rate vs chance (the span's share of assignment tokens), with an
    exact binomial test on the pooled loops."""
    hits, chance, loops, example = [], [], [], None
    for p in problems:
        a = attribute(model, p, n_steps)
        # the heatmap shows the first problem with the most hops (up to 3): one loop per dereference
        if example is None or example["problem"].hops < min(p.hops, 3):
            example = {**a, "problem": p}
        cur = p.query
        assign_tokens = sum(e - s for s, e, _, _ in a["spans"])
        for k in range(p.hops):
            span = next((s for s in a["spans"] if s[2] == cur), None)
            if span is None:
                break
            s, e = span[0], span[1]
            hits.append(bool(s <= int(np.argmax(np.abs(a["attr"][k][: a['spans'][-1][1] if a['spans'] else None]))) < e))
            chance.append((e - s) / max(1, assign_tokens))
            loops.append(k)
            cur = p.path[k]
    if not hits:
        raise LabError("no loops to attribute")
    hits, chance, loops = np.array(hits), np.array(chance), np.array(loops)

    def measure(name: str, sel: np.ndarray) -> Measure:
        m = proportion(name, hits[sel])
        p0 = float(chance[sel].mean())
        m.control, m.control_value = "chance (span share of assignment tokens)", p0
        m.p_value = float(binomtest(int(hits[sel].sum()), int(sel.sum()), p0, alternative="greater").pvalue)
        m.test = "exact binomial vs chance"
        return m

    pooled = measure("loops whose top-attributed token is in the assignment they dereference", np.ones_like(hits))
    # per loop index: a loop that answers without reading its assignment (e.g. by depth on the page) shows here
    per_loop = [measure(f"loop {k}: top-attributed token in the assignment it dereferences", loops == k)
                for k in sorted(set(loops.tolist()))]
    return {"measure": pooled, "per_loop": per_loop, "example": example}


def spread(problems: list[Problem], n: int) -> list[Problem]:
    """n problems taken evenly through the list (test sets are ordered by hop count: the first n would
    all be 1-hop problems)."""
    if n >= len(problems):
        return list(problems)
    return [problems[i * len(problems) // n] for i in range(n)]


def attribution_heatmap(example: dict, title: str | None = None):
    A = example["attr"]
    A = A / (np.abs(A).max(axis=1, keepdims=True) + 1e-12)
    toks = [f"{i}:{t}" for i, t in enumerate(example["tokens"])]
    fig = go.Figure(go.Heatmap(z=A, x=toks, y=[f"loop {k} -> {t}" for k, t in enumerate(example["targets"])],
                               colorscale="RdBu", zmid=0, colorbar=dict(title="IG (row-normalised)")))
    fig.update_layout(xaxis_title="prompt token", yaxis_title="loop (target)", xaxis_tickangle=-60)
    return style(fig, title or "Integrated-gradients attribution of each loop's target to the prompt tokens")


# --- everything at once --------------------------------------------------------------------------------

def probe_report(model: RLF, problems: list[Problem], null_models: list[RLF] | None = None,
                 umap: bool = True, n_attr: int = 40, seed: int = 0):
    """All four probes on the given (held-out) problems, as one lab Report."""
    src = "mamba2backbonerecursion write-up (see PUBLISHED.md)"
    rep = Report(f"RLF probes: {model.config.core} core on {model.base.name}")
    tr = trajectories(model, problems, "pca", seed)
    rep.add(pca_variance_measure(tr["on"]), Published("PCA of 20 latents: variance in 2 components", "95.6%", src))
    rep.figures["rlf_traj_pca_loop"] = trajectory_figure(tr, "loop")
    rep.figures["rlf_traj_pca_state"] = trajectory_figure(tr, "state")
    if umap:
        tu = trajectories(model, problems, "umap", seed)
        rep.figures["rlf_traj_umap_loop"] = trajectory_figure(tu, "loop")
        rep.figures["rlf_traj_umap_state"] = trajectory_figure(tu, "state")
    rep.add(state_probe(tr["on"], seed)["measure"])
    part = gate_partition(model, null_models)
    for i, m in enumerate(part["measures"]):
        pubv = None
        if "published rule" in m.name and m.control is None:
            pubv = Published("gate partition " + ("RAM (gate > 1.01)" if "RAM" in m.name else "ALU (gate < 0.97)"),
                             "124 of 768 = 16.1%" if "RAM" in m.name else "15 of 768 = 2.0%", src)
        rep.add(m, pubv)
    rep.figures["rlf_gate_histogram"] = gate_histogram(part)
    measures, notes = partition_ablations(model, problems, part, seed=seed)
    for m in measures:
        rep.add(m)
    rep.notes += notes
    if n_attr:
        at = attribution_test(model, spread(problems, n_attr))
        rep.add(at["measure"])
        for m in at["per_loop"]:
            rep.add(m)
        rep.figures["rlf_attribution"] = attribution_heatmap(at["example"])
    rep.provenance = {"base": model.base.name, "core": model.config.core, "n_problems": len(problems),
                      "null_runs": len(null_models or []), "seed": seed}
    return rep
