"""Evaluating the inner link: the held-out cosine against its controls, the m-step latent rollout, the
hand-off benchmark (every arm, and the state-reconstruction map's), the report's figures, and `run`,
the whole pipeline (train what is missing, evaluate) that the CLI, `lab reproduce`, the notebook and the
app call.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from lab import LabError
from lab.corpus import documents
from lab.figures import LAB_COLORS, add_published, bars_with_ci, line, style
from lab.innerlink import reconstruct
from lab.innerlink.cache import StateCache, caches, last_layer_states
from lab.innerlink.config import Config
from lab.innerlink.handoff import ARM_LABELS, PERSONA_HALVES, STATE_TASKS, TASKS, handoff_benchmark
from lab.innerlink.model import InnerLink, latent_rollout
from lab.innerlink.train import train_or_load, wants_open_set
from lab.report import Published, Report
from lab.stats import Measure, compare_proportions, mean_with_ci, paired_delta, proportion

SOURCE = "ARM, re-implementing RecursiveMAS (PUBLISHED.md)"


# --- held-out cosine -----------------------------------------------------------------------------

def _per_doc(values: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """Mean of `values` per document (tokens in one document are not independent draws)."""
    _, inv = np.unique(doc, return_inverse=True)
    return np.bincount(inv, weights=values) / np.bincount(inv)


def other_tokens(target: np.ndarray, pool: np.ndarray, rng: np.random.Generator, max_draws: int = 1000) -> np.ndarray:
    """For each target token, a token drawn from `pool` (e.g. the other rows' tokens) that is not the target
    itself: the control of "another token". A control equal to the target would score like the target and
    bias the control towards the trained map."""
    target, pool = np.asarray(target), np.asarray(pool)
    out = pool[rng.integers(0, len(pool), len(target))] if len(pool) else target.copy()
    bad = out == target
    for _ in range(max_draws):
        if not bad.any():
            return out
        out[bad] = pool[rng.integers(0, len(pool), int(bad.sum()))]
        bad = out == target
    raise LabError(f"could not draw a token other than the target for {int(bad.sum())} of {len(target)} rows from "
                   f"a pool of {len(np.unique(pool))} distinct token(s)")


@torch.no_grad()
def heldout_cosines(link: InnerLink, base, held: StateCache, seed: int = 0, chunk: int = 8192) -> dict:
    """Per-row cosines on held-out tokens for the trained map and its controls:
    trained       cos(R_in(h_t), Emb(y_{t+1}))
    shuffled      cos(R_in(h_t), Emb(y')) with y' the next token of a random *other* held-out row whose
                  token differs (frequency-matched "random other token" control)
    identity      cos(h_t, Emb(y_{t+1})): no map at all (tied embeddings make this nonzero)
    untrained     cos(R_0(h_t), Emb(y_{t+1})) with R_0 the same adapter at its seeded init
    nearest_ok    the embedding row nearest to R_in(h_t) by cosine is y_{t+1}
    base_top1_ok  the base's own greedy next token is y_{t+1} (what the head gets from h_t)
    The cached states are float32 and so is the adapter; cosines are taken in float32, and the states go to
    the head (and R_in(h_t) to the embedding matrix) in the base's dtype.
    """
    emb = base.embed.weight.detach()
    emb_n = torch.nn.functional.normalize(emb, dim=-1)
    torch.manual_seed(seed)
    untrained = InnerLink(base.d_model).to(base.device).eval()
    rng = np.random.default_rng(seed)
    y_all = held.column("target").astype(np.int64)
    n = len(y_all)
    y_other = other_tokens(y_all, y_all, rng)  # another row's next token, never this row's own
    out = {k: [] for k in ("trained", "shuffled", "identity", "untrained", "nearest_ok", "base_top1_ok")}
    cos = torch.nn.functional.cosine_similarity
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        h, y = held.rows(idx)
        h, y = h.to(base.device), y.to(base.device)
        yo = torch.from_numpy(y_other[idx]).to(base.device)
        r = link(h).float()  # (N, d)
        e_y = emb[y].float()
        out["trained"].append(cos(r, e_y, dim=-1))
        out["shuffled"].append(cos(r, emb[yo].float(), dim=-1))
        out["identity"].append(cos(h.float(), e_y, dim=-1))
        out["untrained"].append(cos(untrained(h).float(), e_y, dim=-1))
        out["nearest_ok"].append((torch.nn.functional.normalize(r, dim=-1).to(emb_n.dtype) @ emb_n.T).argmax(-1) == y)
        out["base_top1_ok"].append(base.logits(h, normed=True).argmax(-1) == y)
    res = {k: torch.cat(v).float().cpu().numpy() for k, v in out.items()}
    res["doc"] = held.column("doc")
    return res


def cosine_measures(cosines: dict) -> list[Measure]:
    """Measures over held-out documents (n = documents; each value is a per-document token mean)."""
    doc = cosines["doc"]
    per = {k: _per_doc(cosines[k].astype(float), doc) for k in ("trained", "shuffled", "identity", "untrained",
                                                                 "nearest_ok", "base_top1_ok")}
    n_tok = int(len(doc))
    main = mean_with_ci("inner-link mean cos(R_in(h_t), Emb(y_t+1))", per["trained"])
    main.control, main.control_value = "random other token (frequency-matched)", float(per["shuffled"].mean())
    ctrl = mean_with_ci("control cos(R_in(h_t), Emb(random other token))", per["shuffled"])
    vs_shuf = paired_delta("cos gain over random-other-token control", per["trained"], per["shuffled"],
                           "random other token")
    vs_id = paired_delta("cos gain over identity map (no adapter)", per["trained"], per["identity"], "identity map")
    vs_un = paired_delta("cos gain over untrained adapter", per["trained"], per["untrained"], "untrained adapter")
    near = paired_delta("nearest-token top-1 of R_in(h_t) minus base greedy top-1", per["nearest_ok"],
                        per["base_top1_ok"], "base greedy next token")
    for m, key in ((vs_id, "identity"), (vs_un, "untrained")):  # the control's own mean and CI, for its bar
        own = mean_with_ci(key, per[key])
        m.extra["control_ci"] = [own.ci_low, own.ci_high]
    for m in (main, ctrl, vs_shuf, vs_id, vs_un, near):
        m.extra.update({"n_tokens": n_tok, "n_unit": "held-out documents"})
    main.extra["token_mean"] = float(cosines["trained"].mean())
    ctrl.extra["token_mean"] = float(cosines["shuffled"].mean())
    near.extra.update({"nearest_top1": float(per["nearest_ok"].mean()), "base_top1": float(per["base_top1_ok"].mean())})
    return [main, ctrl, vs_shuf, vs_id, vs_un, near]




# --- m-step latent rollout -----------------------------------------------------------------------

@torch.no_grad()
def rollout_eval(link: InnerLink, base, config: Config) -> tuple[list[dict], dict]:
    """m-step rollout from held-out document prefixes. Per step k: cos of latent e_k with the gold
    token's embedding and with the base's own greedy text continuation's token, the chance that e_k's
    nearest token is that greedy token, and the random-other-token control. Returns (table rows, raw)."""
    P, m = config.rollout_prefix, config.rollout_steps
    docs = documents("heldout", config.heldout_docs, config.cache_seed)
    rows = [base.tokenizer.encode(d, add_special_tokens=False) for d in docs]
    rows = [r[: P + m] for r in rows if len(r) >= P + m][: config.rollout_prompts]
    if len(rows) < 2:
        raise LabError(f"only {len(rows)} held-out documents have {P + m} tokens; lower rollout_prefix/steps")
    ids = torch.tensor(rows, device=base.device)                 # (N, P+m)
    emb = base.embed.weight.detach()
    emb_n = torch.nn.functional.normalize(emb, dim=-1)
    lat, _ = latent_rollout(base, link, base.embed(ids[:, :P]), m)  # (N, m, d)
    # the base's own greedy text continuation from the same prefix
    seq = ids[:, :P]
    greedy = []
    for _ in range(m):
        nxt = base.logits(last_layer_states(base, seq)[:, -1], normed=True).argmax(-1)
        greedy.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    greedy = torch.stack(greedy, 1)                               # (N, m)
    gold = ids[:, P:]                                             # (N, m)
    rng = np.random.default_rng(config.seed + 7)
    gold_pool = gold.cpu().numpy().ravel()  # the control draws from every prompt's gold tokens
    cos = torch.nn.functional.cosine_similarity
    table, raw = [], {}
    for k in range(m):
        e = lat[:, k]
        e32 = e.float()  # cosines in float32; the nearest-token search against the embedding matrix in its dtype
        c_gold = cos(e32, emb[gold[:, k]].float(), dim=-1).cpu().numpy()
        c_greedy = cos(e32, emb[greedy[:, k]].float(), dim=-1).cpu().numpy()
        # another gold token of the rollouts, never this prompt's own at this step
        ctrl = torch.from_numpy(other_tokens(gold[:, k].cpu().numpy(), gold_pool, rng)).to(base.device)
        c_ctrl = cos(e32, emb[ctrl].float(), dim=-1).cpu().numpy()
        near = ((torch.nn.functional.normalize(e32, dim=-1).to(emb_n.dtype) @ emb_n.T).argmax(-1)
                == greedy[:, k]).float().cpu().numpy()
        g, c = mean_with_ci("", c_gold), mean_with_ci("", c_ctrl)
        gr, nr = mean_with_ci("", c_greedy), proportion("", near)
        table.append({"step": k + 1, "n": len(rows), "cos_gold": g.value, "cos_gold_lo": g.ci_low, "cos_gold_hi": g.ci_high,
                      "cos_greedy_token": gr.value, "cos_greedy_token_lo": gr.ci_low, "cos_greedy_token_hi": gr.ci_high,
                      "cos_control": c.value, "cos_control_lo": c.ci_low, "cos_control_hi": c.ci_high,
                      "nearest_is_greedy": nr.value, "nearest_is_greedy_lo": nr.ci_low, "nearest_is_greedy_hi": nr.ci_high})
        raw[k + 1] = {"cos_gold": c_gold, "cos_control": c_ctrl, "nearest_is_greedy": near}
    return table, raw


# --- figures -----------------------------------------------------------------------------------------

def cosine_figure(measures) -> go.Figure:
    """Bars of the held-out cosine: the trained map and each control (from `cosine_measures`)."""
    names = ["trained R_in", "random other token", "identity (no map)", "untrained R_in"]
    main, ctrl, vs_id, vs_un = measures[0], measures[1], measures[3], measures[4]
    # every bar is that arm's own mean over documents with its own bootstrap CI (the paired differences
    # and their tests are in the report's table)
    vals = [main.value, ctrl.value, vs_id.control_value, vs_un.control_value]
    lo = [main.ci_low, ctrl.ci_low, vs_id.extra["control_ci"][0], vs_un.extra["control_ci"][0]]
    hi = [main.ci_high, ctrl.ci_high, vs_id.extra["control_ci"][1], vs_un.extra["control_ci"][1]]
    fig = bars_with_ci(names, vals, lo, hi, "Held-out cosine to the next token's input embedding", "mean cos")
    fig.update_layout(xaxis_title=f"n = {main.n} held-out documents ({main.extra['n_tokens']} tokens)")
    # the published trained map and its random-token control, measured the same way on a 14B base
    add_published(fig, "mean cos, trained map and control", xs=names[:2], ys=[0.74, 0.005],
                  source="ARM, Qwen2.5-14B")
    return fig


def rollout_figure(table: list[dict]) -> go.Figure:
    """Per latent step k: cosine to the gold token, the control, and the nearest-token rate (from `rollout_eval`)."""
    x = [r["step"] for r in table]
    return line(x, {"cos(latent e_k, Emb(gold token))": [r["cos_gold"] for r in table],
                    "control: random other document's token": [r["cos_control"] for r in table],
                    "nearest token of e_k = base's greedy token": [r["nearest_is_greedy"] for r in table]},
                "m-step latent rollout (R_in output fed back as the next input embedding)", "latent step k",
                "cos / rate",
                error={"cos(latent e_k, Emb(gold token))": ([r["cos_gold_lo"] for r in table], [r["cos_gold_hi"] for r in table]),
                       "control: random other document's token": ([r["cos_control_lo"] for r in table],
                                                                  [r["cos_control_hi"] for r in table]),
                       "nearest token of e_k = base's greedy token": ([r["nearest_is_greedy_lo"] for r in table],
                                                                      [r["nearest_is_greedy_hi"] for r in table])})


def handoff_figure(summary: list[dict], task: str = "persona") -> go.Figure:
    """B's exact match per arm with Wilson CIs (from `HandoffResult.summary()`); the control arm in its own colour."""
    fig = bars_with_ci([ARM_LABELS.get(r["arm"], r["arm"]) for r in summary], [r["exact_match"] for r in summary],
                       [r["ci_low"] for r in summary], [r["ci_high"] for r in summary],
                       f"Hand-off ({task} task): B's exact match (n = {summary[0]['n']} held-out items, 95% Wilson CI)",
                       "exact match")
    fig.update_traces(marker_color=[LAB_COLORS[0] if r["arm"] not in ("wrong_session",) else LAB_COLORS[1]
                                    for r in summary])
    return style(fig)


# --- the report ----------------------------------------------------------------------------------------

def task_prefix(task: str) -> str:
    return {"persona_state": "state hand-off (persona, A hands off before the question)",
            "persona": "next-token hand-off (persona, A hands off after the question)",
            "pointer": "pointer-chain hand-off"}.get(task, f"{task} hand-off")


def published_handoff(task: str) -> Published | None:
    """The published 0 of 18, beside the inner-link arm of a state task only (its set asks for a state)."""
    if task not in STATE_TASKS:
        return None
    return Published("inner-link latent hand-off on their Hypothesis-Continuity set (not public; beside the lab's "
                     f"{task!r} task, whose answer is a state, not A's next token)", "0 of 18", SOURCE)


def evaluate(link: InnerLink, base, recon: InnerLink | None = None, recon_open: InnerLink | None = None) -> Report:
    """Held-out cosine (vs controls), the m-step rollout, and the hand-off benchmark on the config's task and
    on the other tasks (every arm, plus the state-reconstruction map's on the config's task if `recon` is given,
    and the open-set map's on the held-out half of the personas if `recon_open` is), as one Report.
    Every size and seed comes from `link.config` (a link from `load` or `train_or_load` carries it)."""
    cfg = link.config
    if cfg is None:
        raise LabError("evaluate needs a loaded inner link (lab.innerlink.load or train_or_load), which carries its config")
    art = link.artifact
    rep = Report(f"Inner link (ARM / RecursiveMAS) on {base.name}")
    rep.provenance = {"base": base.name, "base_fingerprint": base.fingerprint[:12], "preset": cfg.preset_name,
                      "artifact": None if art is None else str(art.path),
                      "config_hash": None if art is None else art.manifest.get("config_hash"), "seed": cfg.seed}
    # 1. held-out cosine
    _, held = caches(cfg, base)
    cms = cosine_measures(heldout_cosines(link, base, held, seed=cfg.seed))
    rep.add(cms[0], Published("mean cos(R_in(h_t), Emb(y_t+1)), Qwen2.5-14B on s1K", "0.74", SOURCE))
    rep.add(cms[1], Published("control cosine", "≈0.005", SOURCE))
    for m in cms[2:]:
        rep.add(m)
    rep.figures["innerlink_cosine"] = cosine_figure(cms)
    # 1b. m-step rollout
    table, _ = rollout_eval(link, base, cfg)
    rep.tables["m-step latent rollout"] = table
    rep.figures["innerlink_rollout"] = rollout_figure(table)
    # 2-3. hand-off benchmarks: the main task (a state, when it is persona_state) with the reconstruction maps,
    # then the other tasks as diagnostics
    task = cfg.handoff_task
    res = handoff_benchmark(link, base, cfg, recon=recon, prefix=task_prefix(task))
    for m in res.measures:
        rep.add(m, published_handoff(task) if m.extra.get("arm") == "inner_link" else None)
    if recon is not None:
        rc = reconstruct.recon_cosines(base, recon, res.items, cfg.handoff_steps)
        ic = reconstruct.recon_cosines(base, link, res.items, cfg.handoff_steps)
        rep.add(paired_delta(f"reconstruction cos(B, A) at question tokens ({task} task): recon map minus inner link",
                             rc, ic, "inner-link latents"))
    summary = res.summary()
    rep.tables[f"hand-off arms ({task} task)"] = summary
    rep.tables[f"hand-off items ({task} task, first 40)"] = [{k: v for k, v in r.items() if not k.endswith("_ok")}
                                                            for r in res.rows()[:40]]
    rep.figures["innerlink_handoff"] = handoff_figure(summary, task)
    results = {task: res}
    if recon_open is not None:  # 4. the reconstruction map on answers it never saw in training
        o_res = handoff_benchmark(link, base, cfg, recon=recon, extra_maps={"recon_open": recon_open},
                                  answers=PERSONA_HALVES[1], arms=("inner_link", "recon", "recon_open"),
                                  prefix=f"open-set {task_prefix(task)}")
        for m in o_res.measures:
            if m.extra.get("arm") in ("wrong_session", "inner_link", "recon", "recon_open", "session_a"):
                rep.add(m)
        rep.add(compare_proportions(
            f"open-set reconstruction: map trained on the other 9 personas minus the map trained on all 18, exact "
            f"match on items of {len(PERSONA_HALVES[1])} personas ({task} task)", o_res.correct["recon_open"],
            o_res.correct["recon"], "closed-set map (trained on all 18 personas, these included)"))
        rep.tables[f"open-set reconstruction ({task} task, answers {', '.join(PERSONA_HALVES[1])})"] = o_res.summary()
        results["open_set"] = o_res
    for other in [t for t in TASKS if t != task]:
        o = handoff_benchmark(link, base, cfg, task=other, prefix=task_prefix(other))
        for m in o.measures:
            rep.add(m, published_handoff(other) if m.extra.get("arm") == "inner_link" else None)
        rep.tables[f"hand-off arms ({other} task)"] = o.summary()
        rep.figures[f"innerlink_handoff_{other}"] = handoff_figure(o.summary(), other)
        results[other] = o
    rep.notes += [
        "Cosines are last-layer (final-normed) states of held-out corpus documents; n counts documents "
        "(each value a per-document token mean), CIs bootstrap over documents.",
        "Control cosine: cos(R_in(h_t), Emb(y')) with y' the next token of a random other held-out row, "
        "redrawn until it differs from y_{t+1} (frequency-matched). Identity map: cos(h_t, Emb(y_{t+1})) with no "
        "adapter (the base ties its embedding and head, so this is far from 0). Untrained: the same adapter "
        "at its seeded init.",
        f"Rollout: m = {cfg.rollout_steps} latent steps from {cfg.rollout_prefix}-token held-out prefixes; "
        "'gold' is the document's real next token, 'greedy' the base's own text continuation.",
        f"Hand-off: {len(res.items)} held-out items per task. persona_state: whose story (18 names), A handing off "
        "at the end of the material, before B's question, so the name is never A's next token (checked per item); "
        "persona: the same stories, A handing off after the question, where the name is A's next token (a "
        "next-token diagnostic); pointer: chains of "
        f"{list(cfg.handoff_hops)} hops with {list(cfg.handoff_distractors)} distractor chains, answer = the "
        f"dereference path. A hands over m = {cfg.handoff_steps} vectors; exact match of B's greedy answer; p: exact "
        "McNemar vs the wrong-session arm; agrees_with_A: B's answer equals A's own. 'session A' is A answering "
        "with the material in view (the ceiling any hand-off can reach; a state hand-off is only measurable where "
        "it is well above the commonest-answer guess).",
        "Continuation arm: the embeddings of A's own next m greedy tokens from its hand-off point, without the "
        "question. Diagnostics: how often the first inner-link latent's nearest token (cosine to the input "
        "embeddings) is the gold answer's first token, McNemar-paired with the inner-link arm's exact match, and "
        "how often A's greedy next token at the hand-off point is it.",
        "The published 0 of 18 (ARM's Hypothesis-Continuity set, not public) sits beside the state task's "
        "inner-link arm only: it is the task whose answer is a state A holds, not its next token.",
        f"Open-set reconstruction: a second map trained on items of {', '.join(PERSONA_HALVES[0])} only, tested "
        f"on items of {', '.join(PERSONA_HALVES[1])}, beside the map trained on all 18 on the same items.",
        "State reconstruction (arm 'recon'): R_rec (inner-link shape, initialised from R_in) trained so that B's "
        "last-layer states at the question tokens, given R_rec's latents, match A's states at the same tokens "
        "(1 - cos); see lab/innerlink/reconstruct.py.",
    ]
    rep.extra_result = res  # the hand-off items and answers, for the notebook and app (not serialised)
    rep.extra_results = results  # every benchmark's, by task ("open_set" for the open-set one)
    return rep


def run(config: Config, base=None, *, progress: bool = True) -> Report:
    """The whole inner-link experiment for `config`: train what is missing (the inner link, then the
    state-reconstruction map from it), then `evaluate` with the map's arm. `base=None` loads the config's
    base (`config.load_base()`). `progress` shows the pipeline's stages on a bar."""
    stages = tqdm(total=3, desc=f"inner link ({config.preset_name})", disable=not progress, leave=False)
    base = config.load_base() if base is None else base
    stages.update()
    link = train_or_load(config, base)
    recon = reconstruct.load_recon(reconstruct.artifact_dir(config.preset_name, base), base)
    recon_open = (reconstruct.load_recon(reconstruct.artifact_dir(config.preset_name, base, open_set=True), base,
                                         open_set=True) if wants_open_set(config) else None)
    stages.update()
    rep = evaluate(link, base, recon=recon, recon_open=recon_open)
    stages.update()
    stages.close()
    return rep
