"""The hand-off benchmark: can a latent carry session A's reasoning state into session B?

The lab's own tasks (ARM's "Hypothesis-Continuity" set is not public). In every item, session A reads
material and (in the next-token tasks) ends on a question; B gets the question plus A's hand-off as input
embeddings (a soft prompt), never the material. The answer depends only on the material:

  persona_state  (the default; what the published claim is about: a state, not the next token) - whose
      story is it? A hands off at the end of the material, before the question, so its next token is the
      next sentence's first word, never the name; the name is a state A holds, not what it is about to say.
      A reads  "On Tuesday at dawn, Mara the baker felt hopeful."             (hands off here)
      B gets   <hand-off> " It was 3 o'clock and the birdsong made"          gold: "Mara"
      (session A's own answer: A reads the material and then the question)
  persona  (next-token diagnostic) - the same story, but A hands off at the end of the question, where
      its next token *is* the gold name: a hand-off here measures next-token transmission.
      A reads  "On Tuesday at dawn, Mara the baker felt hopeful. It was 3 o'clock and the birdsong made"
      B gets   <hand-off> " It was 3 o'clock and the birdsong made"          gold: "Mara"
  pointer  (lab.corpus.pointer_chain, the corpus's solved-lookup format; A hands off at the question's
      end, so only the path after its first word is beyond A's next token; A's own accuracy is reported
      so the result can be read):
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
  continuation   the embeddings of A's own next m greedy tokens from the hand-off point, without the
                 question: what a hand-off of A's next tokens (as text) carries
  recon          the state-reconstruction map's latents (lab.innerlink.reconstruct), when given
B answers greedily; exact match against the gold (pointer: the words up to "."; persona: the first
word). Each arm: proportion with a Wilson CI, and an exact McNemar test against the wrong-session arm
on the same items. Also reported: B's agreement with A's own answer (continuity, whether or not A
was right). Diagnostics beside them: how often the first inner-link latent's nearest token is the
gold answer's first token (if that rate is about the hand-off rate, the hand-off carries a token), and
how often A's own greedy next token at the hand-off point is it (about 0 on a state task).
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

ARMS = ("none", "random", "wrong_session", "inner_link", "raw_states", "text", "continuation")
CONTROL_ARM = "wrong_session"
ARM_LABELS = {
    "none": "no hand-off", "random": "random vectors (norm-matched)", "wrong_session": "wrong-session latent",
    "inner_link": "inner-link latent", "raw_states": "A's raw hidden states", "text": "text hand-off (A's words)",
    "continuation": "A's next m greedy tokens (no question)",
    "recon": "state-reconstruction latent", "recon_open": "state-reconstruction latent (map trained on other answers)",
    "session_a": "session A itself (reads the material)",
}


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(".,;:!?'\"") if words else ""


@dataclass(frozen=True)
class Item:
    material: str               # what only session A reads
    question: str               # B's whole prompt; also the last tokens of A's
    answer: str                 # gold
    task: str = "pointer"       # one of TASKS
    hops: int = 1
    n_distractors: int = 0
    state: bool = False         # A hands off at the end of the material, before the question

    def __post_init__(self):
        # a state item whose answer is the word right after A's hand-off point would measure next-token
        # transmission under a state task's name
        if self.state and _first_word(self.question) == _first_word(self.answer):
            raise LabError(f"a state hand-off item whose answer {self.answer!r} is A's next word at the hand-off "
                           f"(the question {self.question!r} starts with it): a state task's answer must not be "
                           f"A's next token")

    @property
    def a_prompt(self) -> str:
        """What A reads to answer itself (material, then the question)."""
        return self.material + self.question

    @property
    def handoff_prompt(self) -> str:
        """What A has read when it hands off: the material (state items) or material and question."""
        return self.material if self.state else self.a_prompt

    def score(self, text: str) -> str:
        """B's answer as compared with the gold: pointer, the words up to '.'; persona, the first word."""
        words = normalize_answer(text)
        if self.task != "pointer":  # the persona tasks: the first word
            return words.split()[0].strip(".,;:!?'\"") if words else ""
        return words

    def to_json(self) -> dict:
        return asdict(self)


TASKS = ("persona_state", "persona", "pointer")
STATE_TASKS = ("persona_state",)   # the answer is never A's next token at the hand-off
# the 18 personas split 9/9: a map trained on one half's items is tested on the other's (an open answer set)
PERSONA_HALVES = (tuple(n for n, _ in PERSONAS[:9]), tuple(n for n, _ in PERSONAS[9:]))


def _pointer_item(rng: random.Random, hops: tuple, distractors: tuple) -> Item:
    h = rng.randint(hops[0], hops[-1])
    nd = max(1, rng.randint(distractors[0], distractors[-1]))
    # matched distractors (a twin chain as long as the queried one), as in the RLF task: with short ones
    # the value at the end of the longest chain answers without the question
    sents, query, path = pointer_chain(rng, h, nd, matched=True)
    return Item(" ".join(sents), f" What is {query}?\nAnswer:", " ".join(path), "pointer", h, nd)


def _persona_item(rng: random.Random, names: tuple | None = None, task: str = "persona") -> Item:
    """Whose story is it? A reads one narrative sentence naming a persona (one of 18, or of `names`); B is
    asked to continue a later sentence of the same story whose next word is that persona's name. B's prompt
    holds only a time cue, never the name or role. task "persona_state": A hands off before the question."""
    pool = [p for p in PERSONAS if names is None or p[0] in names]
    if not pool:
        raise LabError(f"no persona among {names!r}; expected names from {[n for n, _ in PERSONAS]}")
    name, role = rng.choice(pool)
    tod = rng.choice(list(TIMES))
    mood = rng.choice(POSITIVE + NEGATIVE)
    material = f"On {rng.choice(WEEKDAYS)} at {tod}, {name} the {role} felt {mood}."
    question = f" It was {rng.randint(1, 12)} o'clock and the {rng.choice(TIMES[tod])} made"
    return Item(material, question, name, task, 1, 0, state=task in STATE_TASKS)


def make_items(n: int, split: str = "test", seed: int = 0, task: str = "persona", hops: tuple = (1, 2),
               distractors: tuple = (1, 3), exclude: set[str] | None = None, answers: tuple | None = None) -> list[Item]:
    """n items of a split. 'test' (held-out), 'val' and 'train' come from disjoint seed streams
    (string seeds are hashed by random.Random); `exclude` drops items whose A prompt is in it; `answers`
    (persona tasks) restricts the personas to these names."""
    if split not in ("test", "val", "train"):
        raise LabError(f"split must be 'test', 'val' or 'train', got {split!r}")
    if task not in TASKS:
        raise LabError(f"unknown hand-off task {task!r}; expected one of {TASKS}")
    if n < 1:
        raise LabError(f"need n >= 1 items, got {n}")
    if answers is not None and task == "pointer":
        raise LabError("answers= restricts persona names; the pointer task draws its answers at random")
    # the two persona tasks share one item stream (the same stories; only the hand-off point differs)
    stream = "persona" if task in ("persona", "persona_state") else task
    sub = "" if answers is None else "-" + ",".join(sorted(answers))
    rng = random.Random(f"innerlink-handoff-{stream}{sub}-{split}:{seed}")
    out, seen, tries = [], set(exclude or ()), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise LabError(f"could not draw {n} distinct {task!r} items (the task has too few distinct prompts)")
        it = (_pointer_item(rng, tuple(hops), tuple(distractors)) if task == "pointer"
              else _persona_item(rng, answers, task))
        if it.a_prompt in seen:
            continue
        seen.add(it.a_prompt)
        out.append(it)
    return out


def items_for(config, n: int | None = None, split: str = "test", seed: int | None = None, task: str | None = None,
              exclude: set[str] | None = None, answers: tuple | None = None) -> list[Item]:
    """The benchmark items a Config names."""
    return make_items(n or config.handoff_items, split, config.seed if seed is None else seed,
                      task or config.handoff_task, config.handoff_hops, config.handoff_distractors, exclude, answers)


def guess_items_for(config, n: int | None = None, seed: int | None = None, task: str | None = None,
                    answers: tuple | None = None) -> list[Item]:
    """Training-split items to pick the commonest-answer guess on, so it never sees a test label: as many as the
    test set has (`n`, default the config's), and at least 500."""
    return items_for(config, max(n or config.handoff_items, 500), "train", seed, task, answers=answers)


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
    latents: torch.Tensor              # (N, m, d) inner-link rollout from the hand-off point
    raw: torch.Tensor                  # (N, m, d) the raw last-layer states the latents came from
    answers: list[str]                 # A's greedy answers
    correct: np.ndarray                # A's exact match
    continuation: torch.Tensor | None = None   # (N, m) A's own next m greedy tokens at the hand-off point
    gold_first: torch.Tensor | None = None     # (N,) the first token of each gold answer


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
        if it.state and int(qi[0]) == int(gold_first_token(base, it)):
            raise LabError(f"the state hand-off item {it.material!r} + {it.question!r}: its answer {it.answer!r} "
                           f"starts with the token right after A's hand-off point (A's next token); a state task's "
                           f"answer must not be A's next token")
    return a, q


def gold_first_token(base, item: Item) -> int:
    """The first token of the gold answer as it follows the question (a leading space)."""
    return int(_ids(base, " " + item.answer)[0])


def handoff_ids(a_ids: list[torch.Tensor], q_ids: list[torch.Tensor], items: list[Item]) -> list[torch.Tensor]:
    """What A has read when it hands off: its whole prompt, or (state items) the material only."""
    return [a[: len(a) - len(q)] if it.state else a for a, q, it in zip(a_ids, q_ids, items)]


@torch.no_grad()
def greedy_tokens(base, seqs: list[torch.Tensor], steps: int, batch: int = 64) -> torch.Tensor:
    """Exactly `steps` greedy tokens after each embedding sequence. (N, steps)"""
    out = []
    for s in range(0, len(seqs), batch):
        rows, toks = list(seqs[s: s + batch]), []
        for _ in range(steps):
            h, lens = final_states(base, rows)
            nxt = base.logits(last_states(h, lens), normed=True).argmax(-1)   # (B,)
            toks.append(nxt)
            rows = [torch.cat([r, base.embed(t[None])], 0) for r, t in zip(rows, nxt)]
        out.append(torch.stack(toks, 1))
    return torch.cat(out)


def max_answer_tokens(items: list[Item]) -> int:
    return max(2 * it.hops + 3 if it.task == "pointer" else 3 for it in items)


def rollout_items(base, link, h_ids: list[torch.Tensor], steps: int, batch: int = 64):
    """(latents, raw states) of A's m-step rollout under `link` from each hand-off point."""
    lat, raw = [], []
    for s in range(0, len(h_ids), batch):
        la, ra = ragged_rollout(base, link, [base.embed(x) for x in h_ids[s: s + batch]], steps)
        lat.append(la)
        raw.append(ra)
    return torch.cat(lat), torch.cat(raw)


@torch.no_grad()
def run_session_a(base, link, items: list[Item], steps: int, batch: int = 64) -> SessionA:
    """A reads each item's material (and, but for state items, the question); hands over its m-step
    inner-link rollout; answers the question itself with the material in view."""
    if link.d != base.d_model:
        raise LabError(f"the inner link has width {link.d}, the base {base.name!r} has d={base.d_model}")
    a_ids, q_ids = encode_items(base, items)
    h_ids = handoff_ids(a_ids, q_ids, items)
    lat, raw = rollout_items(base, link, h_ids, steps, batch)
    answers = greedy_answers(base, [base.embed(x) for x in a_ids], max_answer_tokens(items))
    correct = np.array([it.score(a) == it.answer for a, it in zip(answers, items)])
    cont = greedy_tokens(base, [base.embed(x) for x in h_ids], steps, batch)
    gold = torch.tensor([gold_first_token(base, it) for it in items], device=cont.device)
    return SessionA(items, a_ids, q_ids, lat, raw, answers, correct, cont, gold)


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
    cont = a.continuation if a.continuation is not None else greedy_tokens(
        base, [base.embed(x) for x in handoff_ids(a.a_ids, a.q_ids, a.items)], m)
    arms = {
        "none": [a.latents.new_zeros(0, d) for _ in range(N)],
        "random": list(rand),
        "wrong_session": list(a.latents[perm]),
        "inner_link": list(a.latents),
        "raw_states": list(a.raw),
        "text": text,
        "continuation": list(base.embed(cont)),
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
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)  # per-item token diagnostics (see module doc)
    continuation: list[str] | None = None    # A's next m greedy tokens at the hand-off point, as text

    def rows(self) -> list[dict]:
        """One row per item: material, gold, and each arm's answer (for tables and the app)."""
        out = []
        for i, it in enumerate(self.items):
            r = {"item": i, "material": it.material, "question": it.question.strip().replace("\n", " "), "gold": it.answer,
                 "task": it.task, "hands_off_after": "material" if it.state else "question"}
            if self.continuation is not None:
                r["A_next_tokens"] = self.continuation[i]
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
def nearest_token_ids(base, vecs: torch.Tensor) -> torch.Tensor:
    """(N,) the vocabulary token whose input embedding is nearest by cosine to each of `vecs` (N, d)."""
    emb = torch.nn.functional.normalize(base.embed.weight.detach().float(), dim=-1)
    return (torch.nn.functional.normalize(vecs.float(), dim=-1) @ emb.T).argmax(-1)


@torch.no_grad()
def run_benchmark(base, link, items: list[Item], steps: int, seed: int = 0,
                  extra: dict[str, torch.Tensor] | None = None, extra_maps: dict | None = None,
                  prefix: str = "hand-off", guess_items: list[Item] | None = None,
                  arms: tuple[str, ...] | None = None) -> HandoffResult:
    """Run A, build every arm's hand-off, let B answer, score. `extra_maps` (name -> map with the
    inner link's interface, e.g. the state-reconstruction map) add arms whose latents come from the
    same m-step rollout of A under that map. `guess_items` (training items): where the commonest-answer
    guess is picked (see `handoff_measures`). `arms`: only these arms (the wrong-session control always)."""
    a = run_session_a(base, link, items, steps)
    extra = dict(extra or {})
    h_ids = handoff_ids(a.a_ids, a.q_ids, items)
    for name, m in (extra_maps or {}).items():
        extra[name] = rollout_items(base, m, h_ids, steps)[0]
    built = arm_handoffs(base, a, seed, extra)
    if arms is not None:
        unknown = set(arms) - set(built)
        if unknown:
            raise LabError(f"unknown hand-off arm(s) {sorted(unknown)}; this benchmark has {sorted(built)}")
        built = {k: v for k, v in built.items() if k in arms or k == CONTROL_ARM}
    answers = {"session_a": a.answers}
    correct = {"session_a": a.correct}
    for arm, soft in built.items():
        answers[arm] = answer_with_handoffs(base, items, a.q_ids, soft)
        correct[arm] = np.array([it.score(x) == it.answer for x, it in zip(answers[arm], items)])
    gold = a.gold_first.cpu()
    diag = {"first_latent_nearest_is_gold": (nearest_token_ids(base, a.latents[:, 0]).cpu() == gold).numpy(),
            "a_next_token_is_gold": (a.continuation[:, 0].cpu() == gold).numpy()}
    cont_text = [base.tokenizer.decode(c.tolist()) for c in a.continuation.cpu()]
    res = HandoffResult(items, answers, correct, latents=a.latents, diagnostics=diag, continuation=cont_text)
    res.measures = handoff_measures(res, prefix, guess_items)
    return res


def handoff_benchmark(link, base, config=None, *, task: str | None = None, recon=None,
                      prefix: str = "hand-off", answers: tuple | None = None, extra_maps: dict | None = None,
                      arms: tuple[str, ...] | None = None) -> HandoffResult:
    """The hand-off benchmark a Config names, as the report, the app page and the notebook run it:
    `config.handoff_items` held-out items of `task` (default `config.handoff_task`) seeded by `config.seed`,
    A handing over `config.handoff_steps` latents, every control arm, the reconstruction map's arm when
    `recon` (a map with the inner link's interface) is given, and the commonest-answer guess picked on as
    many training items (at least 500). `config` defaults to the link's own (`link.config`). `answers`: only
    items whose answer is one of these personas; `extra_maps`: more maps' arms; `arms`: only these arms."""
    config = config if config is not None else link.config
    if config is None:
        raise LabError("the hand-off benchmark needs a Config: pass one, or a link loaded with lab.innerlink.load")
    task = task or config.handoff_task
    items = items_for(config, task=task, answers=answers)
    maps = {**({} if recon is None else {"recon": recon}), **(extra_maps or {})}
    return run_benchmark(base, link, items, config.handoff_steps, seed=config.seed, extra_maps=maps, prefix=prefix,
                         guess_items=guess_items_for(config, len(items), task=task, answers=answers), arms=arms)


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
    if "first_latent_nearest_is_gold" in res.diagnostics and "inner_link" in res.correct:
        # paired per item against the inner-link arm: a rate about equal to the hand-off rate says the
        # hand-off carries the answer's token, not a state
        near = compare_proportions(f"{prefix} diagnostic: first inner-link latent's nearest token is the gold answer",
                                   res.diagnostics["first_latent_nearest_is_gold"], res.correct["inner_link"],
                                   ARM_LABELS["inner_link"] + " exact match")
        near.extra["diagnostic"] = "first_latent_nearest_is_gold"
        nxt = proportion(f"{prefix} diagnostic: A's greedy next token at the hand-off point is the gold answer",
                         res.diagnostics["a_next_token_is_gold"])
        nxt.extra["diagnostic"] = "a_next_token_is_gold"
        out += [near, nxt]
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
