"""The hand-off benchmark: can a latent carry session A's reasoning state into session B?

The lab's own tasks (ARM's "Hypothesis-Continuity" set is not public). In every item, session A reads
material and ends on a question; B gets the same question plus A's hand-off as input embeddings (a
soft prompt), never the material. The answer depends only on the material:

  persona  (the default: the tiny bases solve it from the text) - whose story is it? 18 personas.
      A reads  "On Tuesday at dawn, Mara the baker felt hopeful. It was 3 o'clock and the birdsong made"
      B gets   <hand-off> " It was 3 o'clock and the birdsong made"          gold: "Mara"
  pointer  (lab.corpus.pointer_chain, the corpus's solved-lookup format; too hard for the tiny bases'
      A - its own accuracy is reported so the result can be read):
      A reads  "SX = P. P = D. RJ = D. D = willow. ZD = cobalt. What is SX?\nAnswer:"
      B gets   <hand-off> " What is SX?\nAnswer:"                            gold: "P D willow"

Names, values and intermediate variables are drawn at random, so B's prompt fixes nothing; the
"none" arm and the commonest-answer rate measure what can be guessed without A.

Arms (what B's soft prompt holds):
  none           nothing: B sees only the question
  random         m Gaussian vectors, each scaled to the norm of the matching inner-link latent
  wrong_session  the inner-link latents of another item (a seeded derangement): the key control
  inner_link     A's m-step latent rollout: R_in(h) appended as A's next input embedding m times,
                 starting from A's last-layer state at its last token (RecursiveMAS latent thoughts)
  raw_states     the m raw last-layer states R_in was applied to (the same rollout, no map)
  text           A's own words: the embeddings of A's transcript tail, the question and the answer A
                 generated greedily (" ... made Mara.") - the upper bound
  recon          the state-reconstruction map's latents (lab.innerlink.reconstruct), when given
B answers greedily; exact match against the gold (pointer: the words up to "."; persona: the first
word). Each arm: proportion with a Wilson CI, and an exact McNemar test against the wrong-session arm
on the same items. Also reported: B's agreement with A's own answer (continuity, whether or not A
was right).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lab import LabError
from lab.corpus import NEGATIVE, PERSONAS, POSITIVE, TIMES, WEEKDAYS, pointer_chain
from lab.hooks import capture, forward
from lab.stats import Measure, compare_proportions, proportion

ARMS = ("none", "random", "wrong_session", "inner_link", "raw_states", "text")
CONTROL_ARM = "wrong_session"
ARM_LABELS = {
    "none": "no hand-off", "random": "random vectors (norm-matched)", "wrong_session": "wrong-session latent",
    "inner_link": "inner-link latent", "raw_states": "A's raw hidden states", "text": "text hand-off (A's words)",
    "recon": "state-reconstruction latent", "session_a": "session A itself (reads the material)",
}


@dataclass(frozen=True)
class Item:
    material: str               # what only session A reads
    question: str               # B's whole prompt; also the last tokens of A's
    answer: str                 # gold
    task: str = "pointer"       # "pointer" or "persona"
    hops: int = 1
    n_distractors: int = 0

    @property
    def a_prompt(self) -> str:
        return self.material + self.question

    def score(self, text: str) -> str:
        """B's answer as compared with the gold: pointer, the words up to '.'; persona, the first word."""
        words = normalize_answer(text)
        if self.task == "persona":
            return words.split()[0].strip(".,;:!?'\"") if words else ""
        return words

    def to_json(self) -> dict:
        return asdict(self)


TASKS = ("persona", "pointer")


def _pointer_item(rng: random.Random, hops: tuple, distractors: tuple) -> Item:
    h = rng.randint(hops[0], hops[-1])
    nd = max(1, rng.randint(distractors[0], distractors[-1]))
    # matched distractors (a twin chain as long as the queried one), as in the RLF task: with short ones
    # the value at the end of the longest chain answers without the question
    sents, query, path = pointer_chain(rng, h, nd, matched=True)
    return Item(" ".join(sents), f" What is {query}?\nAnswer:", " ".join(path), "pointer", h, nd)


def _persona_item(rng: random.Random) -> Item:
    """Whose story is it? A reads one narrative sentence naming a persona (one of 18); B is asked to
    continue a later sentence of the same story whose next word is that persona's name. B's prompt
    holds only a time cue, never the name or role."""
    name, role = rng.choice(PERSONAS)
    tod = rng.choice(list(TIMES))
    mood = rng.choice(POSITIVE + NEGATIVE)
    material = f"On {rng.choice(WEEKDAYS)} at {tod}, {name} the {role} felt {mood}."
    question = f" It was {rng.randint(1, 12)} o'clock and the {rng.choice(TIMES[tod])} made"
    return Item(material, question, name, "persona", 1, 0)


def make_items(n: int, split: str = "test", seed: int = 0, task: str = "persona", hops: tuple = (1, 2),
               distractors: tuple = (1, 3), exclude: set[str] | None = None) -> list[Item]:
    """n items of a split. 'test' (held-out), 'val' and 'train' come from disjoint seed streams
    (string seeds are hashed by random.Random); `exclude` drops items whose A prompt is in it."""
    if split not in ("test", "val", "train"):
        raise LabError(f"split must be 'test', 'val' or 'train', got {split!r}")
    if task not in TASKS:
        raise LabError(f"unknown hand-off task {task!r}; expected one of {TASKS}")
    if n < 1:
        raise LabError(f"need n >= 1 items, got {n}")
    rng = random.Random(f"innerlink-handoff-{task}-{split}:{seed}")
    out, seen, tries = [], set(exclude or ()), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise LabError(f"could not draw {n} distinct {task!r} items (the task has too few distinct prompts)")
        it = _pointer_item(rng, tuple(hops), tuple(distractors)) if task == "pointer" else _persona_item(rng)
        if it.a_prompt in seen:
            continue
        seen.add(it.a_prompt)
        out.append(it)
    return out


def items_for(config, n: int | None = None, split: str = "test", seed: int | None = None, task: str | None = None,
              exclude: set[str] | None = None) -> list[Item]:
    """The benchmark items a Config names."""
    return make_items(n or config.handoff_items, split, config.seed if seed is None else seed,
                      task or config.handoff_task, config.handoff_hops, config.handoff_distractors, exclude)


def guess_items_for(config, n: int | None = None, seed: int | None = None, task: str | None = None) -> list[Item]:
    """Training-split items to pick the commonest-answer guess on, so it never sees a test label: as many as the
    test set has (`n`, default the config's), and at least 500."""
    return items_for(config, max(n or config.handoff_items, 500), "train", seed, task)


def normalize_answer(text: str) -> str:
    """B's answer up to the first '.' or newline, whitespace collapsed."""
    for stop in (".", "\n"):
        text = text.split(stop)[0]
    return " ".join(text.split())


# --- ragged batches of input embeddings (every row its own length, right-padded, no mask needed:
# causal models never let a later pad position change an earlier state) ---------------------------

def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([s.shape[0] for s in seqs])
    if int(lens.min()) < 1:
        raise LabError("an empty session: a sequence with no input embeddings")
    x = seqs[0].new_zeros(len(seqs), int(lens.max()), seqs[0].shape[-1])
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
    return x, lens                                                   # (B, T, d), (B,) on the CPU


def final_states(base, seqs: list[torch.Tensor], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The last-layer (final-normed) states (B, T, d) of a ragged batch, via lab.hooks.forward."""
    x, lens = _pad(seqs)
    with (torch.enable_grad() if grad else torch.no_grad()):
        with capture(base, layers=[], final=True, detach=not grad) as cache:
            forward(base, inputs_embeds=x)
    return cache["final"], lens


def last_states(h: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, d): each row's state at its own last position, from final_states' (B, T, d) and (B,) lengths."""
    return h[torch.arange(h.shape[0], device=h.device), (lens - 1).to(h.device)]


def ragged_rollout(base, link, seqs: list[torch.Tensor], steps: int, grad: bool = False):
    """latent_rollout for rows of different lengths: each row's R_in(h_last) is appended at its own end.
    Returns (latents (B, m, d) in the base's dtype, raw states (B, m, d))."""
    if steps < 1:
        raise LabError(f"a latent rollout needs steps >= 1, got {steps}")
    seqs = list(seqs)
    lat, raw = [], []
    for _ in range(steps):
        h, lens = final_states(base, seqs, grad=grad)
        last = last_states(h, lens)                                # (B, d)
        with (torch.enable_grad() if grad else torch.no_grad()):
            e = link(last).to(base.dtype)                          # (B, d) an input embedding of the base
        lat.append(e)
        raw.append(last)
        seqs = [torch.cat([s, e[i: i + 1]], 0) for i, s in enumerate(seqs)]
    return torch.stack(lat, 1), torch.stack(raw, 1)


@torch.no_grad()
def greedy_answers(base, seqs: list[torch.Tensor], max_new: int, batch: int = 64) -> list[str]:
    """Greedy continuation of each embedding sequence until '.', a newline or EOS (or max_new tokens)."""
    tok = base.tokenizer
    emb = base.embed.weight
    out: list[str] = []
    for s in range(0, len(seqs), batch):
        rows = list(seqs[s: s + batch])
        gen = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new):
            h, lens = final_states(base, rows)
            last = last_states(h, lens)
            nxt = base.logits(last, normed=True).argmax(-1)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                gen[i].append(t)
                text = tok.decode(gen[i])
                if t == tok.eos_token_id or "." in text or "\n" in text:
                    done[i] = True
                rows[i] = torch.cat([rows[i], emb[t][None]], 0)
            if all(done):
                break
        out += [tok.decode(g, skip_special_tokens=True) for g in gen]
    return out


def _ids(base, text: str) -> torch.Tensor:
    ids = base.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise LabError(f"an empty session: {text!r} has no tokens")
    return torch.tensor(ids, device=base.device)


@dataclass
class SessionA:
    """What session A produced for each item."""
    items: list[Item]
    a_ids: list[torch.Tensor]          # A's prompt ids (material + question)
    q_ids: list[torch.Tensor]          # the question ids (identical tokens at the end of A's prompt)
    latents: torch.Tensor              # (N, m, d) inner-link rollout
    raw: torch.Tensor                  # (N, m, d) the raw last-layer states the latents came from
    answers: list[str]                 # A's greedy answers
    correct: np.ndarray                # A's exact match


def encode_items(base, items: list[Item]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(A's ids, question ids) with the question tokens byte-identical at the end of A's prompt."""
    if not items:
        raise LabError("an empty session: no items to hand off")
    a, q = [], []
    for it in items:
        if not it.material.strip():
            raise LabError(f"an empty session: the item asking {it.question.strip()!r} has no material for session A to read")
        qi = _ids(base, it.question)
        a.append(torch.cat([_ids(base, it.material), qi]))
        q.append(qi)
        base.check_length(len(a[-1]) + 8)
    return a, q


def max_answer_tokens(items: list[Item]) -> int:
    return max(2 * it.hops + 3 if it.task == "pointer" else 3 for it in items)


@torch.no_grad()
def run_session_a(base, link, items: list[Item], steps: int, batch: int = 64) -> SessionA:
    """A reads each item's material and question; hands over its m-step inner-link rollout."""
    if link.d != base.d_model:
        raise LabError(f"the inner link has width {link.d}, the base {base.name!r} has d={base.d_model}")
    a_ids, q_ids = encode_items(base, items)
    lat, raw = [], []
    for s in range(0, len(items), batch):
        seqs = [base.embed(x) for x in a_ids[s: s + batch]]
        la, ra = ragged_rollout(base, link, seqs, steps)
        lat.append(la)
        raw.append(ra)
    answers = greedy_answers(base, [base.embed(x) for x in a_ids], max_answer_tokens(items))
    correct = np.array([it.score(a) == it.answer for a, it in zip(answers, items)])
    return SessionA(items, a_ids, q_ids, torch.cat(lat), torch.cat(raw), answers, correct)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (item i never receives its own latent)."""
    if n < 2:
        raise LabError(f"a wrong-session control needs at least 2 items, got {n}")
    p = rng.permutation(n)
    fixed = np.flatnonzero(p == np.arange(n))
    for i in fixed:  # swap each fixed point with a neighbour
        j = (i + 1) % n
        p[i], p[j] = p[j], p[i]
    return p


def check_handoff(base, soft: torch.Tensor, what: str = "hand-off") -> None:
    """A soft prompt must be (k, d) or (N, k, d) with the base's width."""
    if not torch.is_tensor(soft):
        raise LabError(f"the {what} must be a torch.Tensor, got {type(soft).__name__}")
    if soft.dim() not in (2, 3) or soft.shape[-1] != base.d_model:
        raise LabError(f"the {what} has shape {tuple(soft.shape)}; expected (k, {base.d_model}) or "
                       f"(items, k, {base.d_model}) latents of the base's width d={base.d_model}")


def arm_handoffs(base, a: SessionA, seed: int = 0, extra: dict[str, torch.Tensor] | None = None) -> dict[str, list[torch.Tensor]]:
    """Each arm's soft prompt per item (a (k_i, d) tensor; k_i = 0 for 'none')."""
    rng = np.random.default_rng(seed)
    N, m, d = a.latents.shape
    lat32 = a.latents.float()  # norms in float32 (the latents are in the base's dtype)
    g = torch.from_numpy(rng.standard_normal((N, m, d)).astype(np.float32)).to(lat32)
    rand = (g / g.norm(dim=-1, keepdim=True) * lat32.norm(dim=-1, keepdim=True)).to(a.latents.dtype)
    perm = torch.from_numpy(derangement(N, rng)).to(a.latents.device)
    text = []
    for it, ans in zip(a.items, a.answers):
        words = it.score(ans)
        text.append(base.embed(_ids(base, it.question + (" " + words if words else "") + ".")))
    arms = {
        "none": [a.latents.new_zeros(0, d) for _ in range(N)],
        "random": list(rand),
        "wrong_session": list(a.latents[perm]),
        "inner_link": list(a.latents),
        "raw_states": list(a.raw),
        "text": text,
    }
    for name, soft in (extra or {}).items():
        check_handoff(base, soft, f"{name} hand-off")
        if soft.dim() != 3 or soft.shape[0] != N:
            raise LabError(f"the {name} hand-off has shape {tuple(soft.shape)}; expected ({N}, k, {d})")
        arms[name] = list(soft)
    return arms


@dataclass
class HandoffResult:
    items: list[Item]
    answers: dict[str, list[str]]            # arm -> B's answers (session_a: A's own)
    correct: dict[str, np.ndarray]           # arm -> exact match per item
    measures: list[Measure] = field(default_factory=list)
    latents: torch.Tensor | None = None      # (N, m, d) A's inner-link latents, for nearest-token views

    def rows(self) -> list[dict]:
        """One row per item: material, gold, and each arm's answer (for tables and the app)."""
        out = []
        for i, it in enumerate(self.items):
            r = {"item": i, "material": it.material, "question": it.question.strip().replace("\n", " "), "gold": it.answer, "task": it.task}
            for arm, ans in self.answers.items():
                r[arm] = it.score(ans[i])
                r[f"{arm}_ok"] = bool(self.correct[arm][i])
            out.append(r)
        return out

    def agreement(self, arm: str) -> np.ndarray:
        """Per item: B's answer under `arm` equals A's own answer (continuity, right or wrong)."""
        return np.array([it.score(b) == it.score(a) for it, a, b in
                         zip(self.items, self.answers["session_a"], self.answers[arm])])

    def summary(self) -> list[dict]:
        return [{"arm": m.extra.get("arm"), "label": m.name, "correct": int(round(m.value * m.n)), "n": m.n,
                 "exact_match": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high,
                 "p_vs_wrong_session": m.p_value, "agrees_with_A": float(self.agreement(m.extra["arm"]).mean())}
                for m in self.measures if m.extra.get("arm")]


def answer_with_handoffs(base, items: list[Item], q_ids: list[torch.Tensor], handoffs: list[torch.Tensor]) -> list[str]:
    """Session B: the hand-off (soft prompt) then the question, answered greedily."""
    seqs = []
    for soft, q in zip(handoffs, q_ids):
        check_handoff(base, soft)
        seqs.append(torch.cat([soft.to(base.device, base.dtype), base.embed(q)], 0))
    return greedy_answers(base, seqs, max_answer_tokens(items))


@torch.no_grad()
def run_benchmark(base, link, items: list[Item], steps: int, seed: int = 0,
                  extra: dict[str, torch.Tensor] | None = None, extra_maps: dict | None = None,
                  prefix: str = "hand-off", guess_items: list[Item] | None = None) -> HandoffResult:
    """Run A, build every arm's hand-off, let B answer, score. `extra_maps` (name -> map with the
    inner link's interface, e.g. the state-reconstruction map) add arms whose latents come from the
    same m-step rollout of A under that map. `guess_items` (training items): where the commonest-answer
    guess is picked (see `handoff_measures`)."""
    a = run_session_a(base, link, items, steps)
    extra = dict(extra or {})
    for name, m in (extra_maps or {}).items():
        lat = [ragged_rollout(base, m, [base.embed(x) for x in a.a_ids[s: s + 64]], steps)[0]
               for s in range(0, len(items), 64)]
        extra[name] = torch.cat(lat)
    arms = arm_handoffs(base, a, seed, extra)
    answers = {"session_a": a.answers}
    correct = {"session_a": a.correct}
    for arm, soft in arms.items():
        answers[arm] = answer_with_handoffs(base, items, a.q_ids, soft)
        correct[arm] = np.array([it.score(x) == it.answer for x, it in zip(answers[arm], items)])
    res = HandoffResult(items, answers, correct, latents=a.latents)
    res.measures = handoff_measures(res, prefix, guess_items)
    return res


def handoff_benchmark(link, base, config=None, *, task: str | None = None, recon=None,
                      prefix: str = "hand-off") -> HandoffResult:
    """The hand-off benchmark a Config names, as the report, the app page and the notebook run it:
    `config.handoff_items` held-out items of `task` (default `config.handoff_task`) seeded by `config.seed`,
    A handing over `config.handoff_steps` latents, every control arm, the reconstruction map's arm when
    `recon` (a map with the inner link's interface) is given, and the commonest-answer guess picked on as
    many training items (at least 500). `config` defaults to the link's own (`link.config`)."""
    config = config if config is not None else link.config
    if config is None:
        raise LabError("the hand-off benchmark needs a Config: pass one, or a link loaded with lab.innerlink.load")
    task = task or config.handoff_task
    items = items_for(config, task=task)
    return run_benchmark(base, link, items, config.handoff_steps, seed=config.seed,
                         extra_maps={} if recon is None else {"recon": recon}, prefix=prefix,
                         guess_items=guess_items_for(config, len(items), task=task))


def commonest_answer(items: list[Item]) -> str:
    """The commonest gold of `items` (ties: the first in sorted order, so the pick does not depend on set order)."""
    if not items:
        raise LabError("the commonest-answer guess needs at least one item to pick from, got none")
    golds = [it.answer for it in items]
    return max(sorted(set(golds)), key=golds.count)


def handoff_measures(res: HandoffResult, prefix: str = "hand-off",
                     guess_items: list[Item] | None = None) -> list[Measure]:
    """Per arm: exact match with n and Wilson CI; exact McNemar vs the wrong-session arm. Also the rate of
    the commonest-answer guess: the commonest gold of `guess_items` (training items, so the guess never sees a
    test label); without them, the commonest gold of the test items themselves, labelled as that oracle (an
    upper bound on any constant answer)."""
    ctrl = res.correct[CONTROL_ARM]
    out = []
    for arm in [*(a for a in res.correct if a != "session_a"), "session_a"]:
        name = f"{prefix} exact match: {ARM_LABELS.get(arm, arm)}"
        if arm == CONTROL_ARM:
            m = proportion(name, res.correct[arm])
        else:
            m = compare_proportions(name, res.correct[arm], ctrl, ARM_LABELS[CONTROL_ARM])
        m.extra["arm"] = arm
        m.extra["agrees_with_A"] = float(res.agreement(arm).mean())
        out.append(m)
    golds = [it.answer for it in res.items]
    if guess_items is not None:
        top = commonest_answer(guess_items)
        how = f"the commonest of {len(guess_items)} training golds"
    else:
        top = commonest_answer(res.items)
        how = "oracle: the commonest gold of these test items, an upper bound on any constant answer"
    guess = proportion(f"{prefix}: commonest-answer guess ({how}; what B's prompt alone could reach)",
                       [g == top for g in golds])
    guess.extra.update(guess=top, picked_on="training items" if guess_items is not None else "these test items")
    out.append(guess)
    return out


@torch.no_grad()
def nearest_tokens(base, vec: torch.Tensor, k: int = 8) -> list[tuple[str, float]]:
    """The k vocabulary tokens whose input embeddings are nearest to `vec` (d,) by cosine."""
    check_handoff(base, vec.reshape(1, -1) if torch.is_tensor(vec) and vec.dim() == 1 else vec, "latent")
    if vec.dim() != 1:
        raise LabError(f"nearest_tokens takes one latent of shape ({base.d_model},), got {tuple(vec.shape)}")
    emb = torch.nn.functional.normalize(base.embed.weight, dim=-1)
    sims = emb @ torch.nn.functional.normalize(vec.to(emb), dim=0)
    top = sims.topk(min(k, sims.numel()))
    return [(base.tokenizer.decode([int(i)]), float(s)) for s, i in zip(top.values, top.indices)]
