"""Two fits of the combiner on cached features (h, T_k, next token y), head frozen.

1. `fit_ce`: cross-entropy of head(h') by gradient, AdamW, as published (lr 1e-3, batch 512,
   80 steps, constant learning rate, weight decay 0.01), on `lab.trainer.fit` (seeded, resumable;
   its AdamW betas are (0.9, 0.95)).
2. `fit_ridge`: closed form. Target: the negative logit-gradient of the base's cross-entropy at h,
       delta_i = -dCE/dh = w_{y_i} - sum_v p_i(v) w_v      (W the head's rows, p = softmax(head(h_i)))
   i.e. the residual from the base's *expected* unembedding toward the *target token's* unembedding.
   Why this target: h' - h = alpha*h + M*T + beta is what the combiner adds, and to first order the
   loss changes by <dCE/dh, h' - h>; a least-squares fit of the update to the negative gradient is
   the linearised (one Gauss-Newton-like step) version of the CE fit, it needs no iterations, and
   unlike "the target's unembedding" alone it does not push toward tokens the base already predicts.
   Ridge solves for (alpha, M, beta) jointly (alpha profiled out exactly, see `_ridge_solve`); the
   step length s (the target's scale is arbitrary) is then set by a 1-D convex line search of the
   validation CE, and lambda is picked from a grid by the same validation CE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from lab import LabError
from lab.combiner.model import Combiner
from lab.trainer import TrainSpec, fit


def _check(base, feats: dict) -> None:
    for key in ("h", "t", "y"):
        if key not in feats:
            raise LabError(f"features need columns h, t, y; missing {key!r}")
    d = base.d_model
    if feats["h"].shape[-1] != d or feats["t"].shape[-1] != d:
        raise LabError(f"mismatched feature widths: h has {feats['h'].shape[-1]}, T has {feats['t'].shape[-1]}, "
                       f"the base {base.name!r} has d = {d}")
    if not len(feats["h"]) == len(feats["t"]) == len(feats["y"]):
        raise LabError(f"feature columns differ in length: h {len(feats['h'])}, T {len(feats['t'])}, y {len(feats['y'])}")


@torch.no_grad()
def ce_nats(base, comb: Combiner | None, feats: dict, batch: int = 4096, **kw) -> torch.Tensor:
    """Per-row cross-entropy (nats) of head(h') (or of head(h) when comb is None). (n,)
    The combiner gets float32 features (its parameters are float32); h' goes to the head in the base's dtype."""
    out = []
    for s in range(0, len(feats["y"]), batch):
        h = feats["h"][s: s + batch].to(base.device)
        if comb is None:
            x = h
        else:
            x = comb(h.float(), feats["t"][s: s + batch].to(base.device).float(), **kw)
        logits = base.logits(x, normed=True).float()
        out.append(F.cross_entropy(logits, feats["y"][s: s + batch].to(base.device), reduction="none").cpu())
    return torch.cat(out)


def fit_ce(base, train: dict, val: dict, steps: int = 80, batch: int = 512, lr: float = 1e-3,
           weight_decay: float = 0.01, seed: int = 0, ckpt_dir: Path | None = None, desc: str = "combiner ce",
           stop_after: int | None = None, use_thought: bool = True) -> tuple[Combiner, dict]:
    """Fit by cross-entropy through the frozen head (AdamW, constant lr, no warm-up).
    use_thought=False keeps M at 0 and fits only alpha and beta: the no-thought control, which
    separates what the thought adds from a plain recalibration of the head's input."""
    _check(base, train)
    _check(base, val)
    n = len(train["y"])
    comb = Combiner(base.d_model).to(base.device)
    if not use_thought:
        comb.M.requires_grad_(False)
    spec = TrainSpec(steps=steps, lr=lr, warmup=0, min_lr_ratio=1.0, weight_decay=weight_decay, grad_clip=1.0,
                     seed=seed, ckpt_every=max(1, steps // 4), eval_every=max(1, steps // 4))
    per_epoch = max(1, n // batch)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        # epoch e's order is a pure function of (seed, e): batches do not depend on history (exact resume)
        e, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, 13, e]).permutation(n)
        idx = torch.from_numpy(perm[i * batch: (i + 1) * batch][rank::world])
        return {"h": train["h"][idx], "t": train["t"][idx], "y": train["y"][idx]}

    def loss_fn(model, b):
        # float32 features into the float32 combiner; h' to the frozen head in the base's dtype
        logits = base.logits(model(b["h"].float(), b["t"].float()), normed=True)
        return F.cross_entropy(logits.float(), b["y"])

    def eval_fn(model):
        return {"val_nats": float(ce_nats(base, model, val).mean())}

    res = fit(comb, batch_fn, loss_fn, spec, ckpt_dir=ckpt_dir, eval_fn=eval_fn, desc=desc, stop_after=stop_after,
              device=base.device)
    comb.requires_grad_(False).eval()
    return comb, {"history": res.history, "steps": steps, "batch": batch, "lr": lr,
                  "val_nats": float(ce_nats(base, comb, val).mean()), "val_nats_base": float(ce_nats(base, None, val).mean())}


@torch.no_grad()
def logit_gradient_target(base, h: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """-dCE/dh at h (the head's input): w_y - E_p[w]. (n, d)"""
    W = base.unembed.weight.detach().float()            # (V, d)
    out = []
    for s in range(0, len(y), batch):
        hb = h[s: s + batch].to(base.device, base.dtype)
        p = torch.softmax(base.logits(hb, normed=True).float(), -1)     # (b, V)
        out.append((W[y[s: s + batch].to(base.device)] - p @ W).cpu())
    return torch.cat(out)


def _ridge_solve(H: torch.Tensor, T: torch.Tensor, D: torch.Tensor, lam: float, lam_alpha: float | None = None):
    """argmin ||D - alpha*H - T M^T - 1 beta^T||^2 + lam (||M||^2 + alpha^2)  (beta unpenalised), float64.

    For fixed alpha, B = [M^T; beta^T] = S X^T (D - alpha H) with X = [T, 1], S = (X^T X + lam I')^-1, so
    B = B0 - alpha B1. By the envelope theorem the optimal alpha satisfies
    <H, r0 - alpha r1> = lam_alpha * alpha  with r0 = D - X B0, r1 = H - X B1.
    """
    H, T, D = H.double(), T.double(), D.double()
    n, d = T.shape
    X = torch.cat([T, torch.ones(n, 1, dtype=T.dtype, device=T.device)], 1)  # (n, d+1)
    reg = torch.full((d + 1,), lam, dtype=T.dtype, device=T.device)
    reg[-1] = 0.0
    A = X.T @ X + torch.diag(reg)
    B0 = torch.linalg.solve(A, X.T @ D)                                 # (d+1, d)
    B1 = torch.linalg.solve(A, X.T @ H)
    r0, r1 = D - X @ B0, H - X @ B1
    lam_a = lam if lam_alpha is None else lam_alpha
    alpha = float((H * r0).sum() / ((H * r1).sum() + lam_a))
    B = B0 - alpha * B1
    return alpha, B[:d].T.contiguous(), B[d].contiguous()                # alpha, M (d, d), beta (d,)


def _scaled(base, alpha: float, M: torch.Tensor, beta: torch.Tensor, s: float) -> Combiner:
    """The float32 combiner for step s (in the base's dtype, 1 + alpha would be rounded to bf16's 2^-8 grid)."""
    c = Combiner(base.d_model)
    with torch.no_grad():
        c.alpha.fill_(s * alpha)
        c.M.copy_(s * M)
        c.beta.copy_(s * beta)
    return c.to(base.device).requires_grad_(False).eval()


def _line_search(base, alpha, M, beta, val: dict) -> tuple[float, float]:
    """The step s >= 0 minimising the validation CE (convex in s: logits are linear in s)."""
    def f(s: float) -> float:
        return float(ce_nats(base, _scaled(base, alpha, M, beta, s), val).mean())
    hi, f_hi = 1.0, f(1.0)
    while hi < 1e6:
        f2 = f(2 * hi)
        if f2 >= f_hi:
            break
        hi, f_hi = 2 * hi, f2
    res = minimize_scalar(f, bounds=(0.0, 2 * hi), method="bounded", options={"xatol": 1e-4 * hi})
    s = float(res.x) if res.fun <= f(0.0) else 0.0
    return s, f(s)


def fit_ridge(base, train: dict, val: dict, lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> tuple[Combiner, dict]:
    """Closed-form ridge on the logit-gradient target; lambda (relative to mean diag of T^T T) and the
    step length chosen on the validation features."""
    _check(base, train)
    _check(base, val)
    if not lambdas or any(not lam > 0 for lam in lambdas):
        raise LabError(f"ridge lambdas must be a non-empty list of positive numbers, got {lambdas!r}")
    D = logit_gradient_target(base, train["h"], train["y"])
    scale = float((train["t"].double() ** 2).sum(0).mean())            # mean diagonal of T^T T
    rows, best = [], None
    for lam in lambdas:
        alpha, M, beta = _ridge_solve(train["h"], train["t"], D, lam * scale)
        s, val_nats = _line_search(base, alpha, M, beta, val)
        rows.append({"lambda": lam, "step": s, "val_nats": val_nats, "alpha": s * alpha})
        if best is None or val_nats < best[0]:
            best = (val_nats, lam, alpha, M, beta, s)
    val_nats, lam, alpha, M, beta, s = best
    comb = _scaled(base, alpha, M, beta, s)
    return comb, {"lambda": lam, "step": s, "grid": rows, "val_nats": val_nats,
                  "val_nats_base": float(ce_nats(base, None, val).mean()), "target": "logit-gradient (w_y - E_p[w])"}
