"""The state-reconstruction objective: the experiment ARM names as the one that could overturn
"the inner link does not carry a reasoning state".

What is trained: a hand-off map R_rec with exactly the inner link's shape and protocol, initialised
from the trained R_in: A's m-step latent rollout (R_rec(h) appended as A's next input embedding, m
times) is B's soft prompt. Only the objective changes, so any difference from the inner-link arm is
the objective's doing, not a bigger or differently wired map.

What is matched: B reads [R_rec latents (m)] + the question (e.g. " It was 3 o'clock and the
birdsong made"). A read [material] + the same question tokens. For every question token j,

    L_rec = mean_j  1 − cos( B_final[j], A_final[j] )

where X_final[j] is the last-layer (final-normed) state at question token j, A's detached as the
teacher. Why these states: the question tokens are the only positions both sessions share, so they
are where "B's state" and "A's state" can be compared token for token; A's states there have
resolved the lookup against the material (A's hypothesis), and the last one is exactly what
the head turns into A's answer - reconstructing it makes B's next-token distribution A's. Why the
last layer and cosine: that is what the head reads, its scale is fixed by the final norm, and it is
the same loss family as L_in. Gradients flow through frozen B and through A's frozen rollout into
R_rec only. Training items come from a seed stream disjoint from the held-out benchmark items, and
any training item whose A prompt equals a held-out one is dropped. The rollout starts where A hands off
(on a state task, the end of the material: the map must carry the state to B's question). The open-set
map (`open_set=True`, its own artifact kind) trains on the items of half the personas only, so its test on
the other half asks whether it carries a state or has learnt the names it was trained on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from lab import LabError, models_dir
from lab.innerlink.config import LINK_FIELDS, Config
from lab.innerlink.handoff import PERSONA_HALVES, Item, encode_items, final_states, handoff_ids, items_for, ragged_rollout
from lab.innerlink.model import InnerLink
from lab.store import Artifact, find_artifacts, load_artifact, made_on, read_json, run_hash, save_artifact
from lab.trainer import TrainSpec, fit

KIND = "innerlink-recon"
OPEN_KIND = "innerlink-recon-open"   # the map trained on one half of the answers (PERSONA_HALVES[0]) only
VAL_ITEMS = 48


def artifact_dir(preset: str, base, open_set: bool = False) -> Path:
    return models_dir() / f"{OPEN_KIND if open_set else KIND}-{preset}-{base.name}"


def recon_loss(base, rmap: InnerLink, items: list[Item], steps: int, per_item: bool = False) -> torch.Tensor:
    """L_rec for a batch of items (see the module docstring); per_item: (B,) means instead."""
    a_ids, q_ids = encode_items(base, items)
    a_seqs = [base.embed(x) for x in a_ids]
    with torch.no_grad():  # the teacher: A's own states at the question tokens
        hA, lensA = final_states(base, a_seqs)
    # the rollout starts where A hands off (state items: before the question)
    h_seqs = [base.embed(x) for x in handoff_ids(a_ids, q_ids, items)]
    lat, _ = ragged_rollout(base, rmap, h_seqs, steps, grad=True)          # (B, m, d)
    b_seqs = [torch.cat([lat[i].to(base.dtype), base.embed(q)], 0) for i, q in enumerate(q_ids)]
    hB, lensB = final_states(base, b_seqs, grad=True)
    losses = []
    for i, q in enumerate(q_ids):
        n = len(q)
        a_q = hA[i, int(lensA[i]) - n: int(lensA[i])]                        # (n, d)
        b_q = hB[i, int(lensB[i]) - n: int(lensB[i])]                        # (n, d)
        # in float32: on a half-precision base the states are bf16/fp16, the map and its loss are not
        losses.append(1 - torch.nn.functional.cosine_similarity(b_q.float(), a_q.float(), dim=-1))
    if per_item:
        return torch.stack([x.mean() for x in losses])
    return torch.cat(losses).mean()


def train_recon(config, base, link: InnerLink, test_items: list[Item], out_dir: Path | None = None,
                stop_after: int | None = None, open_set: bool = False) -> Artifact | None:
    """Fit R_rec (initialised from the trained R_in) with L_rec; resumable through lab.trainer.fit.
    open_set: train and validate on items whose answer is in the first half of the personas only
    (`PERSONA_HALVES[0]`), for a test on the other half."""
    answers = PERSONA_HALVES[0] if open_set else None
    if open_set and config.handoff_task == "pointer":
        raise LabError("the open-set reconstruction map splits the persona answers; handoff_task is 'pointer'")
    exclude = {it.a_prompt for it in test_items}
    val = items_for(config, VAL_ITEMS, "val", exclude=exclude, answers=answers)
    exclude |= {it.a_prompt for it in val}
    rmap = InnerLink(base.d_model).to(base.device)
    rmap.load_state_dict(link.state_dict())
    spec = TrainSpec(steps=config.recon_steps, lr=config.recon_lr, warmup=min(50, config.recon_steps // 5),
                     seed=config.seed, ckpt_every=max(20, config.recon_steps // 5),
                     eval_every=max(10, config.recon_steps // 5), config_hash=run_hash(config.to_dict(), base))

    def batch_fn(step: int, rank: int, world: int) -> dict:
        # a pure function of (seed, step, rank): resume replays exactly
        items = items_for(config, max(1, config.recon_batch // world), "train",
                          config.seed * 1_000_003 + step * 97 + rank, exclude=exclude, answers=answers)
        return {"items": items}

    def loss_fn(model, batch):
        return recon_loss(base, model, batch["items"], config.handoff_steps)

    def eval_fn(model):
        with torch.no_grad():
            return {"val_recon_cos": float(1 - recon_loss(base, model, val, config.handoff_steps))}

    out_dir = Path(out_dir) if out_dir else artifact_dir("custom", base)
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    result = fit(rmap, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn, desc=f"state reconstruction on {base.name}",
                 stop_after=stop_after, device=base.device)
    if stop_after is not None and stop_after < spec.steps:
        return None
    with torch.no_grad():
        init_cos = float(1 - recon_loss(base, link, val, config.handoff_steps))
    art = save_artifact(out_dir, OPEN_KIND if open_set else KIND, dict(rmap.state_dict()), config.to_dict(), base,
                        metrics={"history": result.history, "seconds": round(result.seconds, 2),
                                 "val_recon_cos_inner_link": init_cos, "val_items": VAL_ITEMS,
                                 "answers": list(answers) if answers else "all"})
    shutil.rmtree(ckpt, ignore_errors=True)
    return art


def load_recon(path_or_artifact, base, open_set: bool = False) -> InnerLink:
    """The reconstruction map saved at a path (or an Artifact), carrying its `.config` and `.artifact`;
    checks kind (the open-set map's with `open_set`), hash and base fingerprint."""
    art = path_or_artifact if isinstance(path_or_artifact, Artifact) else load_artifact(
        Path(path_or_artifact), OPEN_KIND if open_set else KIND, base)
    m = InnerLink.from_tensors(art.tensors)
    if m.d != base.d_model:
        raise LabError(f"the reconstruction map at {art.path} has width {m.d}, the base has d={base.d_model}")
    m = m.to(base.device).eval()
    m.config, m.artifact = Config.from_dict(art.config), art
    return m


def recon_for(link: InnerLink, base) -> Path | None:
    """The reconstruction map on disk made for `link` (a loaded inner link, carrying its `.config`), or None:
    made on exactly this base, from a config whose link fields equal the link's (the map is trained from
    that link); one with exactly the link's config first."""
    if link.config is None:
        raise LabError("recon_for needs a loaded inner link (lab.innerlink.load), which carries its config")
    found = []
    for path in find_artifacts(KIND, base.name).values():
        if not made_on(path, base):  # made on an earlier base of this name: its states mean nothing here
            continue
        try:
            have = read_json(path / "config.json")
        except LabError:
            continue
        if link.config.matches(have, LINK_FIELDS):
            found.append((not link.config.matches(have), str(path), path))
    return min(found)[2] if found else None


@torch.no_grad()
def recon_cosines(base, rmap: InnerLink, items: list[Item], steps: int) -> np.ndarray:
    """Per-item mean cos(B_final, A_final) over the question tokens (the quantity L_rec maximises)."""
    out = [1 - recon_loss(base, rmap, items[s: s + 64], steps, per_item=True) for s in range(0, len(items), 64)]
    return torch.cat(out).cpu().numpy()
