"""Inference: run the loop until HALT (or a cap) and read the answers.

- `solve`: greedy loop predictions for many prompts at once, as a `Trace`.
- `outcomes`: per-problem final-answer / full-trace / HALT outcomes of a trace.
- `final_answer_accuracy`: the progress bar's live metric during training.
- `explain`: one typed prompt, fully checked, with per-loop top-k predictions and latents (app, notebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lab import LabError
from lab.hooks import ActivationCache
from lab.rlf.data import Problem, parse_prompt
from lab.rlf.model import RLF, Lifeline, encode_prompts


@dataclass
class Trace:
    """Greedy loop predictions for N problems, run until HALT or the cap."""
    preds: np.ndarray        # (N, K) predicted ids per loop; -1 after the first HALT
    halt_loop: np.ndarray    # (N,) loop index of the first HALT, -1 if none within the cap
    answer: np.ndarray       # (N,) id of the token before the first HALT (else the last prediction; -1 if HALT at loop 0)
    halt_id: int

    @property
    def halted(self) -> np.ndarray:
        return self.halt_loop >= 0


@torch.no_grad()
def solve(model: RLF, prompts: list[str], cap: int, lifeline: Lifeline | None = None,
          batch_size: int = 128, cache=None) -> Trace:
    """Run every prompt until HALT (or `cap` loops) and read the answers."""
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise LabError(f"the loop cap must be a positive integer, got {cap!r}")
    if not prompts:
        raise LabError("expected at least one prompt")
    halt = model.vocab.halt_id
    chunks = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(model.base, prompts[i: i + batch_size])
        logits = model.run(ids, mask, cap, lifeline=lifeline, stop_on_halt=cache is None, cache=cache)
        chunks.append(logits.argmax(-1).T.cpu().numpy())        # (B, K_run)
    K = max(c.shape[1] for c in chunks)
    preds = np.full((len(prompts), K), -1, dtype=np.int64)
    row = 0
    for c in chunks:
        preds[row: row + len(c), : c.shape[1]] = c
        row += len(c)
    is_halt = preds == halt
    halt_loop = np.where(is_halt.any(1), is_halt.argmax(1), -1)
    answer = np.empty(len(prompts), dtype=np.int64)
    for n in range(len(prompts)):
        h = halt_loop[n]
        if h >= 0:
            preds[n, h + 1:] = -1
            answer[n] = preds[n, h - 1] if h >= 1 else -1
        else:
            answer[n] = preds[n, cap - 1] if preds.shape[1] >= cap else preds[n, -1]
    return Trace(preds, halt_loop, answer, halt)


def outcomes(model: RLF, problems: list[Problem], trace: Trace) -> dict[str, np.ndarray]:
    """Per-problem booleans: final, trace, halted, halt_right (at loop == hops), and per-loop step accuracy."""
    wid = model.vocab.word_id
    value = np.array([wid[p.value] for p in problems])
    hops = np.array([p.hops for p in problems])
    final = trace.answer == value
    full = np.zeros(len(problems), dtype=bool)
    for n, p in enumerate(problems):
        want = [wid[w] for w in p.path] + [trace.halt_id]
        got = trace.preds[n, : len(want)].tolist()
        full[n] = got == want and trace.halt_loop[n] == p.hops
    return {"final": final, "trace": full, "halted": trace.halted, "halt_right": trace.halt_loop == hops}


def final_answer_accuracy(model: RLF, problems: list[Problem], cap: int) -> dict:
    """{hops: accuracy, 'all': accuracy} of the final answer (the progress bar's live metric)."""
    was = model.training
    model.eval()
    tr = solve(model, [p.prompt for p in problems], cap)
    model.train(was)
    fin = outcomes(model, problems, tr)["final"]
    hops = np.array([p.hops for p in problems])
    out = {int(h): float(fin[hops == h].mean()) for h in sorted(set(hops.tolist()))}
    out["all"] = float(fin.mean())
    return out


def explain(model: RLF, prompt: str, cap: int, lifeline: Lifeline | list[Lifeline] | None = None,
            topk: int = 5) -> dict | list[dict]:
    """One typed prompt, fully checked: per-loop top-k predictions, the latent trajectory at the
    answer position, and the ground-truth path when the prompt defines one (for the app).
    A list of lifeline specs returns one result per spec, sharing a single base pass."""
    parsed = parse_prompt(prompt)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise LabError(f"the loop cap must be a positive integer, got {cap!r}")
    ids, mask = encode_prompts(model.base, [prompt])
    specs = lifeline if isinstance(lifeline, list) else [lifeline]
    results = []
    with torch.no_grad():
        x0 = model.encode(ids, mask)
        for spec in specs:
            cache = ActivationCache()
            logits = model.run(ids, mask, cap, lifeline=spec, cache=cache, x0=x0)[:, 0]     # (K, V)
            probs = logits.float().softmax(-1)
            top = probs.topk(topk, dim=-1)
            loops, halted_at = [], None
            for k in range(logits.shape[0]):
                row = [(model.vocab.decode(int(i)), float(p)) for p, i in zip(top.values[k], top.indices[k])]
                loops.append({"loop": k, "top": row, "pred": row[0][0]})
                if halted_at is None and int(top.indices[k, 0]) == model.vocab.halt_id:
                    halted_at = k
            preds = [lp["pred"] for lp in loops[: (halted_at + 1) if halted_at is not None else None]]
            answer = preds[-2] if halted_at is not None and halted_at >= 1 else (None if halted_at == 0 else preds[-1])
            latents = cache.stack("latent", prefix="loop")[:, 0].float().cpu().numpy()    # (K, d)
            # the answer position's state norm per loop: what the core reads (after the lifeline add) and what the
            # loop hands on (after the loop norm, when there is one), as the report's per-loop norm trace
            norms = {"core reads": cache.stack("after_lifeline", prefix="loop")[:, 0].float().norm(dim=-1).cpu().numpy(),
                     "after loop": np.linalg.norm(latents, axis=-1)}
            results.append({"loops": loops, "halted_at": halted_at, "answer": answer, "truth": parsed["path"],
                            "latents": latents, "norms": norms, "query": parsed["query"], "n_tokens": int(ids.shape[1])})
    return results if isinstance(lifeline, list) else results[0]

