"""The RLF evaluation report, and `run`: the whole pipeline every front end calls.

Metric definitions (per problem, on held-out test sets; each a proportion with a Wilson 95% CI):
- final-answer accuracy: the token before the first HALT equals the value. If no HALT is emitted
  within the cap, the last loop's prediction counts as the answer (and the miss shows in HALT recall).
- full-trace accuracy: the loops emit exactly path[0], ..., path[-1], HALT.
- HALT precision: among problems whose model halted within the cap, the fraction that halted at
  the right loop (loop == hops). HALT recall: among all problems, the fraction that halted at the
  right loop. Loops after the first HALT are never counted (the published metric counted padded
  HALT loops, which inflates both).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
from scipy.stats import fisher_exact
from tqdm.auto import tqdm

from lab.figures import line, style
from lab.hooks import ActivationCache
from lab.report import Published, Report
from lab.rlf.config import Config, check_comparable
from lab.rlf.data import (
    TASK_VERSION,
    Problem,
    heldout_set,
    heldout_sets,
    length_controlled_set,
    longest_chain_answer,
    parse_prompt,
    prompt_lengths,
    training_length_range,
)
from lab.rlf.infer import Trace, outcomes, solve
from lab.rlf.model import RLF, Lifeline, encode_prompts
from lab.rlf.probes import probe_report, ram_overlap
from lab.rlf.train import train_or_load
from lab.stats import Measure, compare_proportions, mean_with_ci, paired_delta, paired_t, proportion, t_mean

ERROR_KINDS = ("repeats the name it should dereference", "an earlier element of the chain",
               "skips ahead in the chain", "HALT too early", "a distractor's right-hand side", "other",
               "the twin chain's element at this depth")


def _twin_chains(prompt: str, query: str, hops: int) -> list[list[str]]:
    """The distractor chains exactly as long as the queried one ([root, ..., value]), sharing none of its
    names: a model that tracks depth on the page, not the pointer, emits their element at the right depth."""
    a = parse_prompt(prompt)["assignments"]
    own, cur = {query}, query
    while cur in a and a[cur] not in own:
        cur = a[cur]
        own.add(cur)
    out = []
    for root in set(a) - set(a.values()) - {query}:
        chain = [root]
        while chain[-1] in a and len(chain) <= hops + 1:
            chain.append(a[chain[-1]])
        if len(chain) == hops + 1 and not own & set(chain):
            out.append(chain)
    return out


def first_errors(model: RLF, problems: list[Problem], trace: Trace) -> list[dict]:
    """Where and how each wrong trace first goes wrong: one row per problem whose trace is wrong,
    {hops, loop, kind}, kind one of ERROR_KINDS (at that loop the model should emit path[loop]
    while dereferencing chain[loop], where chain = [query, *path])."""
    wid, halt = model.vocab.word_id, trace.halt_id
    rows = []
    for n, p in enumerate(problems):
        chain = [wid[w] for w in (p.query, *p.path)]
        want = chain[1:] + [halt]
        got = trace.preds[n, : len(want)].tolist()
        k = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
        if k is None:
            continue
        g = got[k]
        if k == len(want) - 1:
            continue  # every step right, only the HALT missed: counted by HALT recall, not here
        rhs = {wid[s.split("=")[1].strip()] for s in p.prompt.split("What is")[0].split(".") if "=" in s}
        if g == chain[k]:
            kind = ERROR_KINDS[0]
        elif g in chain[:k]:
            kind = ERROR_KINDS[1]
        elif g in chain[k + 2:]:
            kind = ERROR_KINDS[2]
        elif g == halt:
            kind = ERROR_KINDS[3]
        elif g in {wid[c[k + 1]] for c in _twin_chains(p.prompt, p.query, p.hops)}:
            kind = ERROR_KINDS[6]
        elif g in rhs:
            kind = ERROR_KINDS[4]
        else:
            kind = ERROR_KINDS[5]
        rows.append({"hops": p.hops, "loop": k, "kind": kind})
    return rows


def first_error_table(rows: list[dict], hops: list[int], n_by_hops: dict[int, int]) -> list[dict]:
    """Counts of first errors by hop count, loop and kind (n = problems of that hop count)."""
    c = Counter((r["hops"], r["loop"], r["kind"]) for r in rows)
    return [{"hops": h, "n": n_by_hops[h], "first wrong loop": k, "kind": kind, "count": cnt,
             "share of problems": round(cnt / n_by_hops[h], 4)}
            for (h, k, kind), cnt in sorted(c.items()) if h in hops]



def hop_measures(tag: str, hops: int, oc: dict[str, np.ndarray], control: dict[str, np.ndarray] | None = None,
                 control_name: str | None = None) -> list[Measure]:
    """Final / trace accuracy, HALT precision / recall for one hop count (optionally paired vs a control)."""
    ms = []
    for key, label in (("final", "final-answer acc"), ("trace", "full-trace acc")):
        if control is not None:
            m = compare_proportions(f"{tag} {hops}-hop {label}", oc[key], control[key], control_name)
        else:
            m = proportion(f"{tag} {hops}-hop {label}", oc[key])
        ms.append(m)
    halted = oc["halted"]
    if halted.any():
        ms.append(proportion(f"{tag} {hops}-hop HALT precision", oc["halt_right"][halted]))
    else:
        ms.append(Measure(f"{tag} {hops}-hop HALT precision", float("nan"), 0, extra={"note": "never halted"}))
    ms.append(proportion(f"{tag} {hops}-hop HALT recall", oc["halt_right"]))
    for m in ms:
        m.extra.update({"hops": hops, "arm": tag})
    return ms



# --- the base's own chain-of-thought (a baseline that needs no training) -----------------------

@torch.no_grad()
def base_cot(base, problems: list[Problem], batch_size: int = 128) -> dict[str, np.ndarray]:
    """The frozen base decoding the solution in tokens ("Answer: P D willow."), greedily: it saw
    solved lookups in pretraining, so this is the explicit chain-of-thought the loop replaces.
    Returns per-problem final (last word before '.'), trace (all words right) and first (the first word is the
    first dereference, path[0]) outcomes, and the first word itself (first_word, "" when none was decoded)."""
    tok = base.tokenizer
    final, trace, first_word = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i: i + batch_size]
        ids, mask = encode_prompts(base, [p.prompt for p in chunk])
        lens = mask.sum(1)
        steps = max(p.hops for p in chunk) + 2
        base.check_length(ids.shape[1] + steps)
        pad = tok.pad_token_id or 0
        buf = torch.full((ids.shape[0], ids.shape[1] + steps), pad, dtype=torch.long, device=ids.device)
        buf[:, : ids.shape[1]] = ids
        rows = torch.arange(ids.shape[0], device=ids.device)
        for t in range(steps):
            # Right padding + causal attention: position len-1+t only sees real tokens, so one padded
            # forward decodes every row at its own position.
            cur = buf[:, : ids.shape[1] + t + 1]
            logits = base.model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
            nxt = logits[rows, lens - 1 + t].argmax(-1)
            buf[rows, lens + t] = nxt
        for r, p in enumerate(chunk):
            gen = tok.decode(buf[r, lens[r]: lens[r] + steps].tolist(), skip_special_tokens=True)
            words = gen.split(".")[0].split()
            final.append(bool(words) and words[-1] == p.value)
            trace.append(words == list(p.path))
            first_word.append(words[0] if words else "")
    first = np.array([w == p.path[0] for w, p in zip(first_word, problems)], dtype=bool)
    return {"final": np.array(final), "trace": np.array(trace), "first": first, "first_word": np.array(first_word)}


LOOKUP_CONTROL = "a query-blind guess among the page's right-hand sides"


def base_lookup(base, hops: tuple[int, ...] = (1, 2, 3), n: int = 200, seed: int = 0) -> list[Measure]:
    """Whether the frozen base looks a name up in context: its first decoded word after "Answer:" against the
    first dereference (path[0]) on the held-out test sets, one Measure per hop count (Wilson CI). Control, per
    problem: the expected accuracy of guessing uniformly among the distinct right-hand sides on the page (a paired
    sign-flip p). The paper-shaped loop starts from this base's final states, so a base near the control gives
    it nothing to loop on."""
    out = []
    for h in hops:
        problems = heldout_set(h, n, seed)
        first = base_cot(base, problems)["first"]
        guess = [1.0 / len(set(parse_prompt(p.prompt)["assignments"].values())) for p in problems]
        m = proportion(f"{base.name}: {h}-hop first dereference acc (base, greedy)", first)
        d = paired_delta(m.name, first.astype(float), guess, LOOKUP_CONTROL)
        m.control, m.control_value, m.p_value, m.test = LOOKUP_CONTROL, d.control_value, d.p_value, d.test
        m.extra.update({"hops": h, "base": base.name})
        out.append(m)
    return out


# --- the report ------------------------------------------------------------------------------------

ABLATIONS = ("zero", "zero (norm-matched)", "zero after loop 0", "noise", "shuffle", "other")
LIFELINE_KEYS = ("zero", "zero (norm-matched)", "zero after loop 0")   # the ablations summarised across seeds


def ablation(name: str, seed: int = 0) -> Lifeline:
    """The inference-time lifeline intervention an ABLATIONS name stands for."""
    specs = {"zero": dict(mode="zero"), "zero (norm-matched)": dict(mode="zero_matched"),
             "zero after loop 0": dict(mode="zero", from_loop=1), "noise": dict(mode="noise"),
             "shuffle": dict(mode="shuffle"), "other": dict(mode="other")}
    return Lifeline(**specs[name], seed=seed)


def trained_context(base) -> int | None:
    """The context length the base was trained on (a lab base: its pretraining window; else its position table):
    positions past it were never trained, and the lifeline carries them straight into the loop."""
    return (base.meta.get("preset") or {}).get("seq_len") or base.max_len


def _mean_vs(name: str, ours, theirs, control_name: str, seed: int = 0) -> Measure:
    """Mean of per-unit values with its bootstrap CI, beside a control measured on the same units (paired
    sign-flip p of the difference)."""
    m = mean_with_ci(name, ours, seed=seed)
    d = paired_delta(name, ours, theirs, control_name, seed=seed)
    m.control, m.control_value, m.p_value, m.test = control_name, d.control_value, d.p_value, d.test
    return m


def _unpaired(name: str, ours: np.ndarray, theirs: np.ndarray, control_name: str) -> Measure:
    """A proportion beside a control measured on other problems (Fisher exact)."""
    m = proportion(name, ours)
    m.control, m.control_value = control_name, float(np.mean(theirs)) if len(theirs) else float("nan")
    if len(ours) and len(theirs):
        m.p_value = float(fisher_exact([[ours.sum(), (~ours).sum()], [theirs.sum(), (~theirs).sum()]])[1])
        m.test = "Fisher exact (unpaired)"
    return m


def per_loop_accuracy(model: RLF, problems: list[Problem], trace: Trace) -> np.ndarray:
    """Per problem, the share of its loops 0..hops whose prediction is the target (path, then HALT): the
    published in-distribution metric's unit (it also counted padded HALT loops of shorter chains)."""
    wid = model.vocab.word_id
    out = []
    for n, p in enumerate(problems):
        want = [wid[w] for w in p.path] + [trace.halt_id]
        got = trace.preds[n, : len(want)].tolist()
        got += [-1] * (len(want) - len(got))
        out.append(float(np.mean([g == w for g, w in zip(got, want)])))
    return np.array(out)


@torch.no_grad()
def state_norms(model: RLF, problems: list[Problem], loops: int, lifeline: Lifeline | None = None,
                batch_size: int = 128) -> dict[str, np.ndarray]:
    """Answer-position state norms per loop (no early stop): {"core reads": (N, loops) the state after the
    lifeline add (what the loop RoPE and the core read), "after loop": (N, loops) the state the loop hands on}."""
    reads, after = [], []
    for i in range(0, len(problems), batch_size):
        ids, mask = encode_prompts(model.base, [p.prompt for p in problems[i: i + batch_size]])
        cache = ActivationCache()
        model.run(ids, mask, loops, lifeline=lifeline, cache=cache)
        reads.append(cache.stack("after_lifeline", prefix="loop").norm(dim=-1).T.float().cpu().numpy())
        after.append(cache.stack("latent", prefix="loop").norm(dim=-1).T.float().cpu().numpy())
    return {"core reads": np.concatenate(reads), "after loop": np.concatenate(after)}
PUBLISHED_SOURCE = "mamba2backbonerecursion write-up (see PUBLISHED.md)"


def _published(arch: str, core: str, loop: str):
    gpt = arch != "mamba2"
    pub = {
        "in_dist": Published("in-distribution accuracy, " + ("GPT-2-124M" if gpt else "Mamba2-130M") + ": a per-loop "
                             "average (padded HALT loops included) on in-order chains of its hops 1-5", "98.5%" if gpt
                             else "99.9%", PUBLISHED_SOURCE),
        "halt_p": Published("HALT precision, " + ("GPT-2-124M" if gpt else "Mamba2-130M") + " (padded HALT loops counted)",
                            "0.999" if gpt else "1.000", PUBLISHED_SOURCE),
        "plus2": Published("8 variables answered after training on its 1-5 hops (lab hops 2-6): +2 hops beyond "
                           "training, n = 1 prompt (p = 0.557)", "1 of 1", PUBLISHED_SOURCE),
    }
    if arch == "mamba2" and core == "mamba2" and loop == "paper":  # the claim is about the Mamba2 configuration only
        pub["lifeline"] = Published("lifeline removable at inference (Mamba2): loop predictions unchanged with it "
                                    "zeroed (one prompt, both traces failing)", "9 of 10", PUBLISHED_SOURCE)
    return pub


def run_arm(model: RLF, sets: dict[int, list[Problem]], cap: int, lifeline: Lifeline | None = None
            ) -> dict[int, dict]:
    """{hops: {outcomes..., 'trace_obj': Trace}} for one arm on every test set."""
    out = {}
    for h, probs in sets.items():
        tr = solve(model, [p.prompt for p in probs], cap, lifeline=lifeline)
        out[h] = {**outcomes(model, probs, tr), "trace_obj": tr}
    return out


def _pooled(arm: dict[int, dict], hops, key: str) -> np.ndarray:
    return np.concatenate([arm[h][key] for h in hops])


def seed_summary(arms: dict[str, dict], hops: list[int], in_hops: list[int]) -> dict[str, float]:
    """The numbers one training seed contributes to the across-seed measures: final-answer accuracy per hop count,
    in-distribution pooled, and in-distribution with each lifeline ablation of LIFELINE_KEYS."""
    main = arms["RLF"]
    out = {f"{h}-hop final-answer acc": float(main[h]["final"].mean()) for h in hops}
    out["in-distribution final-answer acc"] = float(_pooled(main, in_hops, "final").mean())
    for key in LIFELINE_KEYS:
        if f"lifeline {key}" in arms:
            out[f"in-distribution final-answer acc, lifeline {key}"] = float(
                _pooled(arms[f"lifeline {key}"], in_hops, "final").mean())
    return out


def across_seeds(rep: Report, summaries: list[dict], seeds: list[int], max_train: int, pub: dict) -> None:
    """Across-seed means with t intervals (per-seed rows beside them) for every extrapolation and lifeline number."""
    rows = [{"seed": s, **{k: round(v, 4) for k, v in d.items()}} for s, d in zip(seeds, summaries)]
    rep.tables["per training seed (final-answer accuracy)"] = rows
    if len(summaries) < 2:
        rep.notes.append(f"One training seed ({seeds[0]}): the CIs cover held-out problems, not the variation between "
                         "training runs (set method_seeds for that).")
        return
    unit = "training seed (its own initialisation and data order)"
    col = lambda k: np.array([d[k] for d in summaries])  # noqa: E731
    for key in summaries[0]:
        if "lifeline" in key:
            continue
        hops = int(key.split("-")[0]) if key[0].isdigit() else None
        extra = f" (+{hops - max_train} beyond training)" if hops and hops > max_train else ""
        m = t_mean(f"across {len(seeds)} seeds: {key}{extra}", col(key))
        m.extra.update(seeds=seeds, per_seed=col(key).round(4).tolist(), unit=unit)
        rep.add(m, pub["plus2"] if hops == max_train + 2 else None)
    intact = col("in-distribution final-answer acc")
    for key in LIFELINE_KEYS:
        name = f"in-distribution final-answer acc, lifeline {key}"
        if name in summaries[0]:
            m = paired_t(f"across {len(seeds)} seeds: {name} minus intact", col(name), intact, "lifeline intact")
            m.extra.update(seeds=seeds, per_seed=(col(name) - intact).round(4).tolist(), unit=unit)
            rep.add(m)


def evaluate(model: RLF, baselines: dict[str, RLF] | None = None, n: int | None = None,
             max_hops: int | None = None, ablations: bool = True, cot: bool = True, seed: int = 0,
             progress: bool = True, seed_models: list[RLF] | None = None, length_controls: bool = True) -> Report:
    """The RLF report: per hop 1..max_hops final-answer / full-trace accuracy and HALT precision /
    recall (n, Wilson CI), the same for each baseline (paired exact McNemar vs the method on the
    same problems), inference-time lifeline ablations (plain and norm-matched zero, zero after loop 0, noise,
    shuffle, another prompt) with per-loop state norms, accuracy by prompt length and the length-controlled test
    sets, the base's own chain-of-thought, and (seed_models: the method trained with other seeds) across-seed
    means with t intervals. n and max_hops default to the model's config (test_n, test_max_hops); seed picks the
    test sets. Prompts longer than the base's trained context are reported apart, never in a hop count's headline."""
    cfg = model.config
    base = model.base
    n = n or cfg.test_n
    max_hops = max_hops or cfg.test_max_hops
    cap = cfg.infer_cap
    ctx = trained_context(base)
    tok = base.tokenizer
    all_sets = heldout_sets(tuple(range(1, max_hops + 1)), n, seed)
    sets, beyond = {}, {}
    for h, probs in all_sets.items():
        lens = prompt_lengths(tok, probs)
        keep = [p for p, L in zip(probs, lens) if ctx is None or L <= ctx]
        if keep:
            sets[h] = keep
        beyond[h] = [p for p, L in zip(probs, lens) if ctx is not None and L > ctx]
    hops = sorted(sets)
    in_hops = [h for h in hops if h <= cfg.max_train_hops]
    pub = _published(base.arch, cfg.core, cfg.loop)
    rep = Report(f"Recursive Latent Forcing: {cfg.core} core on {base.name}" + (" (paper loop)" if cfg.loop == "paper" else ""))
    art = getattr(model, "artifact", None)
    rep.provenance = {"base": base.name, "base_fingerprint": base.fingerprint[:12], "core": cfg.core, "loop": cfg.loop,
                      "loop_norm": cfg.loop_norm, "decay": cfg.decay,
                      "variant": cfg.variant, "seed": cfg.seed, "test_seed": seed, "n_per_hop": n,
                      "loop_cap": cap, "artifact": str(art.path) if art else "in memory",
                      "trained_context": ctx, "task_version_trained": cfg.task_version, "task_version_tested": TASK_VERSION,
                      "config_hash": art.manifest.get("config_hash") if art else None}
    arms: dict[str, dict] = {}
    jobs = [("RLF", model, None)]
    if ablations:
        jobs += [(f"lifeline {a}", model, ablation(a, seed)) for a in ABLATIONS]
    for name, bm in (baselines or {}).items():
        check_comparable(cfg, bm.config, f"baseline {name!r}")
        jobs.append((name, bm, None))
    # every arm gets the method's loop budget: a baseline trained with another infer_cap (a field the
    # comparability check leaves to evaluation) must not be compared at a different one
    for name, m, ll in tqdm(jobs, desc="rlf evaluate", disable=not progress):
        arms[name] = run_arm(m, sets, cap, ll)
    main = arms["RLF"]

    # Headlines (pooled in-distribution), each against a paired control on the same problems.
    ctrl_name = next((k for k in arms if k not in ("RLF",) and not k.startswith("lifeline")), None)
    fin = _pooled(main, in_hops, "final")
    if ctrl_name:
        head = compare_proportions(f"in-distribution (1-{max(in_hops)} hops) final-answer acc", fin,
                                   _pooled(arms[ctrl_name], in_hops, "final"), ctrl_name)
    else:
        head = proportion(f"in-distribution (1-{max(in_hops)} hops) final-answer acc", fin)
    rep.add(head)
    # the published in-distribution figure is a per-loop average: beside the same unit, per problem
    per_loop = np.concatenate([per_loop_accuracy(model, sets[h], main[h]["trace_obj"]) for h in in_hops])
    name = "in-distribution per-loop accuracy (loops 0..hops, shuffled chains; share per problem)"
    if ctrl_name:
        ctrl_loop = np.concatenate([per_loop_accuracy(model, sets[h], arms[ctrl_name][h]["trace_obj"]) for h in in_hops])
        rep.add(_mean_vs(name, per_loop, ctrl_loop, ctrl_name, seed), pub["in_dist"])
    else:
        rep.add(mean_with_ci(name, per_loop, seed=seed), pub["in_dist"])
    halted = _pooled(main, in_hops, "halted")
    right = _pooled(main, in_hops, "halt_right")
    rep.add(proportion("in-distribution HALT precision", right[halted]) if halted.any()
            else Measure("in-distribution HALT precision", float("nan"), 0), pub["halt_p"])
    # recall and full-trace accuracy are per-problem outcomes, paired with the first baseline's on the same
    # problems; precision's denominator (the problems each model halted on) differs by model, so it is not
    for key, label in (("halt_right", "HALT recall"), ("trace", "full-trace acc")):
        name = f"in-distribution {label}"
        ours = _pooled(main, in_hops, key)
        rep.add(compare_proportions(name, ours, _pooled(arms[ctrl_name], in_hops, key), ctrl_name) if ctrl_name
                else proportion(name, ours))
    # The query-blind control: what "the value at the end of the longest chain" scores on the same problems
    rule_rng = random.Random(f"rlf-rule:{seed}")
    rule = {h: {"final": np.array([longest_chain_answer(p.prompt, rule_rng) == p.value for p in sets[h]])}
            for h in hops}
    rule_name = "query-blind rule (value at the end of the longest chain)"
    rep.add(compare_proportions(f"in-dist final-answer acc, {rule_name}", _pooled(rule, in_hops, "final"), fin, "RLF"))
    plus2 = cfg.max_train_hops + 2
    if plus2 in main and len(seed_models or []) == 0:   # with several seeds the across-seed mean carries it
        rep.add(compare_proportions(f"+2 hops beyond training ({plus2}-hop) final-answer acc", main[plus2]["final"],
                                    rule[plus2]["final"], "query-blind rule"), pub["plus2"])
    if ablations:
        _lifeline_rows(rep, model, sets, arms, in_hops, fin, pub, seed, cap, baselines)

    for name in arms:
        if name == "RLF" or name.startswith("lifeline"):
            continue
        rep.add(compare_proportions(f"in-dist final-answer acc, baseline {name}", _pooled(arms[name], in_hops, "final"),
                                    fin, "RLF"))
    cot_res = base_cot(base, [p for h in hops for p in sets[h]]) if cot else None
    if cot_res is not None:
        idx = np.concatenate([[h] * len(sets[h]) for h in hops])
        cot_by = {h: {"final": cot_res["final"][idx == h], "trace": cot_res["trace"][idx == h]} for h in hops}
        rep.add(compare_proportions("in-dist final-answer acc, base chain-of-thought (tokens)",
                                    np.concatenate([cot_by[h]["final"] for h in in_hops]), fin, "RLF"))

    # Per-hop measures and the table.
    rows = []
    for name, arm in arms.items():
        for h in hops:
            ms = hop_measures(name, h, arm[h], None if name == "RLF" else main[h], None if name == "RLF" else "RLF")
            for m in ms:
                rep.measures.append(m)
            rows.append({"arm": name, "hops": h, "n": len(arm[h]["final"]),
                         **{k: _cell(m) for k, m in zip(("final", "trace", "halt_precision", "halt_recall"), ms)}})
    for h in hops:
        m = compare_proportions(f"query-blind rule {h}-hop final-answer acc", rule[h]["final"], main[h]["final"], "RLF")
        rep.measures.append(m)
        rows.append({"arm": rule_name, "hops": h, "n": len(rule[h]["final"]), "final": _cell(m), "trace": "-",
                     "halt_precision": "-", "halt_recall": "-"})
    if cot_res is not None:
        for h in hops:
            m1 = compare_proportions(f"base CoT {h}-hop final-answer acc", cot_by[h]["final"], main[h]["final"], "RLF")
            m2 = compare_proportions(f"base CoT {h}-hop full-trace acc", cot_by[h]["trace"], main[h]["trace"], "RLF")
            rep.measures += [m1, m2]
            rows.append({"arm": "base chain-of-thought", "hops": h, "n": len(cot_by[h]["final"]),
                         "final": _cell(m1), "trace": _cell(m2), "halt_precision": "-", "halt_recall": "-"})
    rep.tables["per-hop results"] = rows
    errs = [r for h in hops for r in first_errors(model, sets[h], main[h]["trace_obj"])]
    rep.tables["where wrong traces first break (RLF)"] = first_error_table(errs, hops, {h: len(sets[h]) for h in hops})

    _length_rows(rep, model, sets, beyond, main, in_hops, hops, n, seed, cap, ctx, length_controls)

    # Several training seeds: the same numbers per seed, their mean and t interval.
    summaries = [seed_summary(arms, hops, in_hops)]
    for sm in tqdm(seed_models or [], desc="rlf seeds", disable=not progress):
        check_comparable(cfg, sm.config, "method seed")
        s_arms = {"RLF": run_arm(sm, sets, cap)}
        if ablations:
            s_arms.update({f"lifeline {a}": run_arm(sm, {h: sets[h] for h in in_hops}, cap, ablation(a, seed))
                           for a in LIFELINE_KEYS})
        summaries.append(seed_summary(s_arms, hops, in_hops))
    across_seeds(rep, summaries, [cfg.seed] + [sm.config.seed for sm in seed_models or []], cfg.max_train_hops, pub)

    # Figures: accuracy by hop count for every arm, with Wilson bands.
    for key, label in (("final", "final-answer accuracy"), ("trace", "full-trace accuracy")):
        series, err = {}, {}
        all_arms = dict(arms)
        if key == "final":
            all_arms[rule_name] = rule
        if cot_res is not None:
            all_arms["base chain-of-thought"] = cot_by
        for name, arm in all_arms.items():
            ps = [proportion("x", arm[h][key]) for h in hops]
            series[name] = [p.value for p in ps]
            err[name] = ([p.ci_low for p in ps], [p.ci_high for p in ps])
        fig = line(hops, series, f"RLF {label} by hop count (trained on 1-{cfg.max_train_hops})", "hops",
                   label, error=err)
        fig.add_vrect(x0=0.5, x1=cfg.max_train_hops + 0.5, fillcolor="#999", opacity=0.08, line_width=0,
                      annotation_text="trained", annotation_position="top left")
        rep.figures[f"rlf_{key}_by_hops"] = fig
    ps = {k: [proportion("x", main[h][k2][main[h]["halted"]] if k == "precision" else main[h][k2]) if
              (k != "precision" or main[h]["halted"].any()) else None for h in hops]
          for k, k2 in (("precision", "halt_right"), ("recall", "halt_right"))}
    fig = line(hops, {f"HALT {k}": [p.value if p else float("nan") for p in v] for k, v in ps.items()},
               "RLF HALT precision and recall by hop count", "hops", "rate",
               error={f"HALT {k}": ([p.ci_low if p else float("nan") for p in v], [p.ci_high if p else float("nan") for p in v])
                      for k, v in ps.items()})
    rep.figures["rlf_halt_by_hops"] = style(fig)
    if art is not None and art.manifest.get("metrics", {}).get("history"):
        hist = art.manifest["metrics"]["history"]
        fig = line([r["step"] for r in hist],
                   {f"validation final-answer acc (1-{cfg.max_train_hops} hops)": [r.get("val_acc") for r in hist]},
                   "RLF learning curve (held-out validation set)", "step", "accuracy")
        rep.figures["rlf_learning_curve"] = fig
        rep.tables["learning curve"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in hist]
    rep.notes += [
        "Test sets: held-out problems from a seed stream never used for training; training additionally drops any prompt "
        "that occurs in a test or validation set. Assignments are shuffled and 1-3 distractor chains are present, the "
        "first exactly as long as the queried chain and each ending in another value, so a model that ignores the "
        "question can reach about 1/2 (the query-blind rule row is that control). Task version "
        f"{TASK_VERSION}; version 1 (1-2-hop distractors) let that rule answer every 3+-hop problem.",
        "Hop convention: lab hops count dereferences (\"K = walnut. What is K?\" is 1 hop); the published \"k hops\" is "
        "lab hops k+1, so its 8-variable success is +2 beyond its training range and sits beside the lab's "
        f"+2 point ({plus2} hops here).",
        "HALT precision counts only the first HALT of each problem (the published metric counted padded HALT loops).",
        "Baselines are compared with the method on the same problems (exact McNemar); lifeline ablations act at inference only.",
        "'Where wrong traces first break' classifies the first wrong loop of each wrong trace by what it emitted instead "
        "(traces whose only miss is the final HALT are left to HALT recall).",
    ]
    if "lifeline" not in pub:
        rep.notes.append("The published lifeline-removability claim is about the Mamba2 configuration (Mamba2 base and "
                         "core, the base's upper blocks re-run inside every loop: loop='paper'); this run is not that "
                         "configuration, so the claim is not placed beside it.")
    if cfg.task_version != TASK_VERSION:
        rep.notes.append(f"This model was trained on task version {cfg.task_version} and is tested on version {TASK_VERSION}.")
    if cfg.base_blocks != -1:
        rep.notes.append(f"The loop starts from the base's state after {cfg.base_blocks} of its blocks "
                         f"({'its embedding layer' if cfg.base_blocks == 0 else 'not its final block'}), not from the "
                         "whole base as published; the base's final norm and unembedding read every loop.")
    return rep


def _lifeline_rows(rep: Report, model: RLF, sets, arms, in_hops, fin, pub, seed, cap, baselines) -> None:
    """Lifeline ablation measures, the loop-prediction agreement row, and the per-loop state norms."""
    main = arms["RLF"]
    # the unit is the problem (its loops are not independent draws): per problem, the share of its loops whose
    # prediction is unchanged when the lifeline is zeroed, beside the same share when another problem's lifeline
    # replaces it (a lifeline whose content matters changes more under that swap than under a removal)
    unchanged, swapped, trace_off, trace_on = [], [], [], []

    def agree(a_tr, b_tr, r, K):
        a = a_tr.preds[r, :K]
        b = b_tr.preds[r, :K] if b_tr.preds.shape[1] >= K else np.pad(b_tr.preds[r], (0, K - b_tr.preds.shape[1]),
                                                                        constant_values=-1)
        return float((a == b).mean())

    for h in in_hops:
        on, off, oth = main[h]["trace_obj"], arms["lifeline zero"][h]["trace_obj"], arms["lifeline other"][h]["trace_obj"]
        for r in np.flatnonzero(main[h]["trace"]):
            unchanged.append(agree(on, off, r, h + 1))
            swapped.append(agree(on, oth, r, h + 1))
        trace_off.append(arms["lifeline zero"][h]["trace"])
        trace_on.append(main[h]["trace"])
    if len(unchanged) >= 2:
        rep.add(_mean_vs("loop predictions unchanged with lifeline zeroed (share per correct trace)", unchanged, swapped,
                         "another problem's lifeline in its place", seed), pub.get("lifeline"))
    rep.add(compare_proportions("full trace right with lifeline zeroed (all in-dist problems)",
                                np.concatenate(trace_off), np.concatenate(trace_on), "lifeline on"))
    for abl in ABLATIONS:
        a = arms[f"lifeline {abl}"]
        rep.add(compare_proportions(f"in-dist final-answer acc, lifeline {abl}", _pooled(a, in_hops, "final"),
                                    fin, "lifeline on"))
    # per-loop state norms, on a spread of in-distribution and longer problems, every loop up to the cap
    probs = [p for h in sorted(sets) for p in sets[h][: max(4, 64 // len(sets))]]
    runs = {"lifeline on": (model, None), "lifeline zero": (model, ablation("zero")),
            "lifeline zero (norm-matched)": (model, ablation("zero (norm-matched)"))}
    if baselines and "no lifeline" in baselines:
        runs["baseline no lifeline"] = (baselines["no lifeline"], None)
    rows, series, err = [], {}, {}
    for name, (m, spec) in runs.items():
        norms = state_norms(m, probs, cap, spec)
        ms = [mean_with_ci(f"state norm the core reads, loop {k}, {name}", norms["core reads"][:, k], seed=seed)
              for k in range(cap)]
        after = norms["after loop"].mean(0)
        rows += [{"arm": name, "loop": k, "n": mk.n, "norm the core reads": mk.value_text(),
                  "norm after the loop": round(float(after[k]), 3)} for k, mk in enumerate(ms)]
        series[name] = [mk.value for mk in ms]
        err[name] = ([mk.ci_low for mk in ms], [mk.ci_high for mk in ms])
    rep.tables["per-loop state norms (answer position)"] = rows
    rep.figures["rlf_state_norms"] = line(list(range(cap)), series, "State norm the core reads, per loop (answer "
                                          "position; lifeline on, zeroed, zeroed norm-matched)", "loop", "L2 norm",
                                          error=err)


def _length_rows(rep: Report, model: RLF, sets, beyond, main, in_hops, hops, n, seed, cap, ctx, controls: bool) -> None:
    """Accuracy by prompt-length stratum; prompts beyond the trained context apart; the length-controlled sets."""
    cfg = model.config
    tok = model.base.tokenizer
    lo, hi = training_length_range(tok, cfg.max_train_hops, cfg.seed)
    rows = []
    for h in hops:
        lens = np.array(prompt_lengths(tok, sets[h]))
        for label, sel in ((f"within the training lengths (<= {hi} tokens)", lens <= hi),
                           (f"longer than any training prompt ({hi + 1}-{ctx or 'any'} tokens)", lens > hi)):
            if sel.any():
                m = proportion(f"RLF {h}-hop final-answer acc, prompts {label}", main[h]["final"][sel])
                m.extra.update(hops=h, stratum=label)
                rep.measures.append(m)
                rows.append({"hops": h, "prompt length": label, "n": int(sel.sum()), "final": _cell(m)})
    long_probs = {h: p for h, p in beyond.items() if p}
    for h, probs in long_probs.items():
        oc = outcomes(model, probs, solve(model, [p.prompt for p in probs], cap))
        m = proportion(f"RLF {h}-hop final-answer acc, prompts beyond the base's trained context ({ctx} tokens)",
                       oc["final"])
        m.extra.update(hops=h, stratum="beyond trained context")
        rep.measures.append(m)
        rows.append({"hops": h, "prompt length": f"beyond the base's trained context (> {ctx} tokens; apart from "
                     "every headline)", "n": len(probs), "final": _cell(m)})
    rep.tables["final-answer accuracy by prompt length (RLF)"] = rows
    rep.notes.append(f"Training prompts are {lo}-{hi} tokens long (1-{cfg.max_train_hops} hops). Longer chains come with "
                     "longer prompts, so the per-hop curve mixes loop count with prompt length: the length table and the "
                     "length-controlled sets separate the two. The base was trained on "
                     f"{ctx} tokens of context; longer prompts are reported only in the length table.")
    if not controls:
        return
    crow = []
    short_ok = [h for h in hops if h > cfg.max_train_hops]
    for h in short_ok:   # longer chains held to the training lengths: fewer distractors (the twin alone)
        probs = length_controlled_set(h, n, tok, seed, max_len=hi, distractors=(1, 1))
        if not probs:
            crow.append({"set": f"{h} hops held to <= {hi} tokens", "n": 0, "final": "no such prompt",
                         "standard test set": _cell(proportion("x", main[h]["final"]))})
            continue
        oc = outcomes(model, probs, solve(model, [p.prompt for p in probs], cap))
        m = _unpaired(f"{h}-hop final-answer acc, prompts held to the training lengths (<= {hi} tokens, one distractor)",
                      oc["final"], main[h]["final"], f"standard {h}-hop test set")
        m.extra.update(hops=h, length_control="short")
        rep.add(m)
        crow.append({"set": f"{h} hops held to <= {hi} tokens", "n": m.n, "final": _cell(m),
                     "standard test set": _cell(proportion("x", main[h]["final"]))})
    for h in in_hops:    # trained chains padded with distractors past every training prompt
        probs = length_controlled_set(h, n, tok, seed, min_len=hi + 1, max_len=ctx, distractors=(3, 24))
        if not probs:
            continue
        oc = outcomes(model, probs, solve(model, [p.prompt for p in probs], cap))
        m = _unpaired(f"{h}-hop final-answer acc, padded with distractors past the training lengths "
                      f"({hi + 1}-{ctx} tokens)", oc["final"], main[h]["final"], f"standard {h}-hop test set")
        m.extra.update(hops=h, length_control="padded")
        rep.add(m)
        crow.append({"set": f"{h} hops padded to {hi + 1}-{ctx} tokens", "n": m.n, "final": _cell(m),
                     "standard test set": _cell(proportion("x", main[h]["final"]))})
    rep.tables["length-controlled test sets (RLF)"] = crow


def _cell(m: Measure) -> str:
    return "n/a" if m.n == 0 or m.ci_low is None else m.value_text()


def run(config: Config, base=None, *, progress: bool = True) -> Report:
    """The whole RLF experiment as one report: train what is missing (the method with `config.method_seeds` seeds,
    its BASELINES and `config.null_runs` shuffled-supervision controls), evaluate (config.test_n problems per hop count),
    and probe (config.probe_n held-out problems per trained hop count, config.probe_attr_n for attribution,
    UMAP if config.probe_umap). base=None: `config.load_base()`."""
    base = base if base is not None else config.load_base()
    model, *seed_models = [train_or_load(c, base) for c in config.seed_runs()]
    baselines = {name: train_or_load(c, base) for name, c in config.baselines().items()}
    nulls = [train_or_load(c, base) for c in config.null_controls()]
    report = evaluate(model, baselines=baselines, progress=progress, seed_models=seed_models)
    n = config.probe_n
    problems = [p for h in range(1, config.max_train_hops + 1)
                for p in heldout_set(h, max(n, config.test_n), config.seed)[:n]]
    probes = probe_report(model, problems, nulls, umap=config.probe_umap, n_attr=config.probe_attr_n, seed=config.seed)
    report.measures += probes.measures
    report.published.update(probes.published)
    report.notes += probes.notes
    report.figures.update(probes.figures)
    for m in ram_overlap([model, *seed_models]):
        report.add(m)
    report.provenance["null_runs"] = [str(m.artifact.path) for m in nulls]
    report.provenance["method_seed_runs"] = [str(m.artifact.path) for m in (model, *seed_models)]
    return report
