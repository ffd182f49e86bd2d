"""Config, build, train and the cosine / rollout evaluation of the inner link.

Training is "graph-free" as in RecursiveMAS/ARM: the base never enters the graph; each step reads a
batch of cached last-layer states h_t and next tokens y_{t+1} from the Arrow cache and minimises
L_in = 1 − cos(R_in(h_t), Emb(y_{t+1})), with Emb the base's (frozen) input embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lab import LabError, models_dir
from lab.configcheck import check_field_types
from lab.innerlink.adapter import InnerLink, cosine_loss
from lab.innerlink.cache import StateCache, get_cache, last_layer_states
from lab.stats import Measure, mean_with_ci, paired_delta, proportion
from lab.store import Artifact, load_artifact, run_hash, save_artifact

KIND = "innerlink"


@dataclass
class Config:
    base: str = "tiny-gpt2"          # the frozen base whose states are mapped
    # --- state cache (Arrow, memory-mapped) ---
    train_docs: int = 6000           # corpus 'train' documents whose states are cached
    heldout_docs: int = 300          # corpus 'heldout' documents for the held-out cosine
    cache_seed: int = 1234           # corpus seed
    max_tokens: int = 128            # tokens per document kept
    # --- inner-link training: L_in = 1 - cos(R_in(h_t), Emb(y_{t+1})) ---
    steps: int = 1500
    batch_size: int = 256            # cached (h_t, y_{t+1}) rows per step
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0                    # adapter init, batch order, controls
    eval_rows: int = 4096            # held-out rows scored on the progress bar
    # --- m-step latent rollout (R_in output appended as the next input embedding) ---
    rollout_steps: int = 4           # m
    rollout_prefix: int = 16         # tokens of a held-out document before the rollout starts
    rollout_prompts: int = 200       # held-out documents rolled out
    # --- hand-off benchmark (lab.innerlink.handoff) ---
    handoff_task: str = "persona"    # "persona" (whose story) or "pointer" (pointer-chain lookup)
    handoff_items: int = 300         # held-out items (>= 200)
    handoff_hops: tuple = (1, 2)     # pointer task: hops per item (uniform over the range, inclusive)
    handoff_distractors: tuple = (1, 3)  # pointer task: distractor chains per item (inclusive range)
    handoff_steps: int = 4           # latents A hands over (m rollout steps)
    # --- state-reconstruction hand-off map (lab.innerlink.reconstruct) ---
    recon_steps: int = 300           # (each step backpropagates through m+1 base forwards: ~1-3 s on a busy CPU)
    recon_batch: int = 16            # training items per step (disjoint from the held-out items)
    recon_lr: float = 5e-4

    PRESETS = ("smoke", "tiny", "paper")

    def __post_init__(self):
        from lab.innerlink.handoff import TASKS
        check_field_types(self)
        if self.handoff_task not in TASKS:
            raise LabError(f"inner-link config: handoff_task must be one of {TASKS}, got {self.handoff_task!r}")
        for k in ("train_docs", "heldout_docs", "max_tokens", "steps", "batch_size", "eval_rows", "rollout_steps",
                  "rollout_prompts", "handoff_items", "handoff_steps", "recon_steps", "recon_batch"):
            if getattr(self, k) < 1:
                raise LabError(f"inner-link config: {k} must be >= 1, got {getattr(self, k)}")
        for k in ("lr", "recon_lr"):
            if getattr(self, k) <= 0:
                raise LabError(f"inner-link config: {k} must be > 0, got {getattr(self, k)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        if name == "smoke":  # seconds: tests and CI notebooks
            c = cls(base="smoke-gpt2", train_docs=300, heldout_docs=60, steps=80, batch_size=128, warmup=10,
                    eval_rows=1024, rollout_prompts=40, handoff_items=200, recon_steps=30, recon_batch=8)
        elif name == "tiny":  # the CPU experiment (minutes)
            c = cls()
        elif name == "paper":  # ARM's setting: a GPU and a real HF base (not runnable on this machine)
            c = cls(base="Qwen/Qwen2.5-14B-Instruct", train_docs=8078, max_tokens=256, steps=3000, batch_size=256,
                    lr=1e-4, handoff_items=500, recon_steps=3000)
        else:
            raise LabError(f"unknown inner-link preset {name!r}; expected one of {cls.PRESETS}")
        return c.replace(**overrides)

    def replace(self, **kw) -> "Config":
        names = {f.name for f in fields(self)}
        bad = [k for k in kw if k not in names]
        if bad:
            raise LabError(f"unknown inner-link config field(s) {bad}; fields are {sorted(names)}")
        return type(self)(**{**asdict(self), **kw})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_dict_json(self) -> dict:
        """As it reads back from config.json (tuples become lists)."""
        import json
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def build(config: Config, base) -> InnerLink:
    """The adapter for this base, seeded (W1, W2 d×d; 2d² + 6d parameters)."""
    torch.manual_seed(config.seed)
    return InnerLink(base.d_model).to(base.device)


def artifact_dir(preset: str, base) -> Path:
    return models_dir() / f"innerlink-{preset}-{base.name}"


def caches(config: Config, base) -> tuple[StateCache, StateCache]:
    train = get_cache(base, "train", config.train_docs, config.cache_seed, config.max_tokens)
    held = get_cache(base, "heldout", config.heldout_docs, config.cache_seed, config.max_tokens)
    return train, held


def train(config: Config, base, out_dir: Path | None = None, stop_after: int | None = None) -> Artifact | None:
    """Fit R_in on the cached train states (seeded, resumable through lab.trainer.fit); save it."""
    from lab.trainer import TrainSpec, fit
    train_cache, held = caches(config, base)
    link = build(config, base)
    emb = base.embed.weight.detach()  # (V, d), frozen target space
    spec = TrainSpec(steps=config.steps, lr=config.lr, warmup=min(config.warmup, config.steps // 2),
                     seed=config.seed, ckpt_every=max(50, config.steps // 5), eval_every=max(20, config.steps // 5),
                     config_hash=run_hash(config.to_dict(), base))
    n_eval = min(config.eval_rows, len(held))
    eval_h, eval_y = held.rows(np.arange(n_eval))

    def batch_fn(step: int, rank: int, world: int) -> dict:
        rng = np.random.default_rng([config.seed, step, rank])
        h, y = train_cache.rows(rng.integers(0, len(train_cache), max(1, config.batch_size // world)))
        return {"h": h, "y": y}

    def loss_fn(model, batch):
        return cosine_loss(model(batch["h"]), emb[batch["y"]])

    def eval_fn(model):
        return {"heldout_cos": float(1 - cosine_loss(model(eval_h.to(base.device)), emb[eval_y.to(base.device)]))}

    out_dir = Path(out_dir) if out_dir else artifact_dir("custom", base)
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    result = fit(link, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn, desc=f"inner link on {base.name}",
                 stop_after=stop_after, device=base.device)
    if stop_after is not None and stop_after < spec.steps:
        return None
    art = save_artifact(out_dir, KIND, {k: v for k, v in link.state_dict().items()}, config.to_dict(), base,
                        metrics={"history": result.history, "seconds": round(result.seconds, 2),
                                 "train_rows": len(train_cache), "n_params": link.n_params()})
    import shutil
    shutil.rmtree(ckpt, ignore_errors=True)
    return art


def load(path_or_artifact, base) -> tuple[InnerLink, Config, Artifact]:
    """(adapter, config, artifact) from an artifact directory; checks kind, hash and base fingerprint."""
    art = path_or_artifact if isinstance(path_or_artifact, Artifact) else load_artifact(Path(path_or_artifact), KIND, base)
    link = InnerLink.from_tensors(art.tensors)
    if link.d != base.d_model:
        raise LabError(f"the inner link at {art.path} has width {link.d}, the base {base.name!r} has d={base.d_model}")
    return link.to(base.device).eval(), Config.from_dict(art.config), art


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

def latent_rollout(base, link: InnerLink, prefix_embeds: torch.Tensor, steps: int,
                   grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RecursiveMAS latent thoughts: from the state at the end of `prefix_embeds` (B, T, d), append
    R_in(h) as the next input embedding, `steps` times, through lab.hooks.forward(inputs_embeds=...).
    Returns (latents (B, m, d) in the base's dtype, the raw last-layer states they were made from (B, m, d))."""
    from lab.hooks import capture, forward
    if steps < 1:
        raise LabError(f"a latent rollout needs steps >= 1, got {steps}")
    link.check_width(prefix_embeds, "prefix embedding")
    seq = prefix_embeds
    lat, raw = [], []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for _ in range(steps):
            with capture(base, layers=[], final=True, detach=not grad) as cache:
                forward(base, inputs_embeds=seq)
            h = cache["final"][:, -1]          # (B, d)
            e = link(h).to(base.dtype)         # (B, d) the latent thought, an input embedding of the base
            raw.append(h)
            lat.append(e)
            seq = torch.cat([seq, e[:, None]], dim=1)  # (B, T+k, d)
    return torch.stack(lat, 1), torch.stack(raw, 1)


@torch.no_grad()
def rollout_eval(link: InnerLink, base, config: Config) -> tuple[list[dict], dict]:
    """m-step rollout from held-out document prefixes. Per step k: cos of latent e_k with the gold
    token's embedding and with the base's own greedy text continuation's token, the chance that e_k's
    nearest token is that greedy token, and the random-other-token control. Returns (table rows, raw)."""
    from lab.corpus import documents
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
