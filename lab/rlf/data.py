"""Pointer-chain problems that need real dereferencing, for Recursive Latent Forcing.

A problem is the base corpus's solved-lookup format without its solution:

    "SX = P. P = D. RJ = D. D = willow. ZD = cobalt. What is SX?\nAnswer:"

built by `lab.corpus.pointer_chain(..., matched=True)`: assignments in shuffled order; a twin distractor
chain exactly as long as the queried one and further distractor chains of 1..hops, each ending in
another value; sometimes an extra name pointing into the queried chain or the twin. The per-loop
targets are the dereference path from the queried name to its value ("P", "D", "willow"), then HALT:
loop k must emit step k.

Why matched lengths: with the base corpus's 1-2-hop distractors, the queried chain of 3+ hops is the
longest on the page, and the query-blind rule "the value at the end of the longest chain"
(`longest_chain_answer`) scored 100% on every 3-12-hop test set of that task version (v1). On
this version it is a control every report shows beside the model.

Splits never share a seed stream: training batches come from `random.Random("rlf-train:...")`,
validation (the progress bar, early stopping) from "rlf-val:...", the held-out test sets (1-12 hops,
>= 500 each) from "rlf-test:..."; string seeds are hashed (sha512) by `random.Random`, so the streams
are disjoint. In addition, training drops any problem whose prompt text occurs in a test or
validation set, so no evaluated prompt is ever trained on. That exclusion covers the test sets of test
seed 0, the one every lab path evaluates on; the problem space is large enough that other test seeds are
held out in practice too: none of seed 1's 3,000 test prompts (1-6 hops, 500 each) is among the 383,992
distinct prompts of 6,000 training batches of 64 (seed 0, unfiltered).
Test sets are saved as JSONL under
`data/rlf/` and reloaded (with a check that they regenerate identically from their seed).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from lab import LabError, data_dir
from lab.corpus import HALT, VALUE_WORDS, VARIABLE_NAMES, pointer_chain, single_token_id
from lab.store import atomic_write_text

ANSWER_MARKER = "\nAnswer:"   # logits are read at the ":" that ends the prompt
TRAIN_HOPS = (1, 2, 3, 4, 5)
TEST_HOPS = tuple(range(1, 13))
DISTRACTORS = (1, 3)          # distractor chains per problem, inclusive range: never zero (the first is the twin)
TEST_SIZE = 500
TASK_VERSION = 2              # in the saved test sets' file names: v1 (short distractors) had the longest-chain shortcut


@dataclass(frozen=True)
class Problem:
    prompt: str               # ends with ANSWER_MARKER
    query: str                # the queried variable
    path: tuple[str, ...]     # names met after the query, then the value (len == hops)
    hops: int
    n_distractors: int

    @property
    def value(self) -> str:
        return self.path[-1]

    @property
    def targets(self) -> list[str]:
        """What loop k must emit: path[k], then HALT."""
        return [*self.path, HALT]

    def to_json(self) -> dict:
        return {**asdict(self), "path": list(self.path)}


def format_prompt(assignments: list[str], query: str) -> str:
    return f"{' '.join(assignments)} What is {query}?{ANSWER_MARKER}"


def make_problem(rng: random.Random, hops: int, n_distractors: int | None = None) -> Problem:
    """One problem with `hops` dereferences and 1-3 distractor chains (the first as long as the queried one)."""
    if n_distractors is None:
        n_distractors = rng.randint(*DISTRACTORS)
    sents, query, path = pointer_chain(rng, hops, n_distractors, matched=True)
    # distractor chains actually written (fewer when long chains exhaust the 52 names): count the chain ends
    n_values = sum(s.split("= ")[1].rstrip(".") in VALUE_WORDS for s in sents)
    return Problem(format_prompt(sents, query), query, tuple(path), hops, n_values - 1)


def longest_chain_answer(prompt: str, rng: random.Random | None = None) -> str:
    """A query-blind control: the value at the end of the longest chain on the page (ties broken at
    random by `rng`, else the alphabetically first). What a model that ignores the question can get."""
    assignments = parse_prompt(prompt)["assignments"]

    def follow(name: str) -> tuple[int, str]:
        depth, seen = 0, set()
        while name in assignments and name not in seen:
            seen.add(name)
            name, depth = assignments[name], depth + 1
        return depth, name

    ends = [follow(n) for n in assignments]
    best = max(d for d, _ in ends)
    values = sorted({v for d, v in ends if d == best})
    return rng.choice(values) if rng is not None else values[0]


def _test_rng(hops: int, seed: int) -> random.Random:
    return random.Random(f"rlf-test:{seed}:{hops}")


def _val_rng(seed: int) -> random.Random:
    return random.Random(f"rlf-val:{seed}")


def generate_heldout_set(hops: int, n: int = TEST_SIZE, seed: int = 0) -> list[Problem]:
    """n distinct problems with exactly `hops` hops, from the test seed stream."""
    if not 1 <= hops <= len(VARIABLE_NAMES) - 2:
        raise LabError(f"hops must be in 1..{len(VARIABLE_NAMES) - 2}, got {hops}")
    if n < 1:
        raise LabError(f"a test set needs n >= 1 problems, got {n}")
    rng, seen, out = _test_rng(hops, seed), set(), []
    while len(out) < n:
        p = make_problem(rng, hops)
        if p.prompt not in seen:  # distinct prompts, so n counts independent items
            seen.add(p.prompt)
            out.append(p)
    return out


def heldout_path(hops: int, n: int, seed: int) -> Path:
    return data_dir() / "rlf" / f"test-v{TASK_VERSION}-h{hops:02d}-n{n}-s{seed}.jsonl"


def heldout_set(hops: int, n: int = TEST_SIZE, seed: int = 0) -> list[Problem]:
    """The held-out test set for one hop count: generated once, saved under data/rlf/, reloaded
    (a saved set whose size or first problem differs from what its seed generates is regenerated)."""
    path = heldout_path(hops, n, seed)
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        probs = [Problem(r["prompt"], r["query"], tuple(r["path"]), r["hops"], r["n_distractors"]) for r in rows]
        if len(probs) == n and probs[0] == generate_heldout_set(hops, 1, seed)[0]:
            return probs
    probs = generate_heldout_set(hops, n, seed)
    atomic_write_text(path, "".join(json.dumps(p.to_json()) + "\n" for p in probs))
    return probs


def heldout_sets(hops: tuple[int, ...] = TEST_HOPS, n: int = TEST_SIZE, seed: int = 0) -> dict[int, list[Problem]]:
    return {h: heldout_set(h, n, seed) for h in hops}


def validation_set(n_per_hop: int = 100, hops: tuple[int, ...] = TRAIN_HOPS, seed: int = 0) -> list[Problem]:
    """A small held-out set for live accuracy during training (disjoint from the test sets)."""
    rng, out = _val_rng(seed), []
    for h in hops:
        out += [make_problem(rng, h) for _ in range(n_per_hop)]
    return out


@lru_cache(maxsize=8)
def excluded_prompts(test_n: int = TEST_SIZE, seed: int = 0, val_n_per_hop: int = 100) -> frozenset[str]:
    """Every evaluated prompt (test sets 1-12, validation): training never emits one of them."""
    prompts = {p.prompt for h in TEST_HOPS for p in generate_heldout_set(h, max(test_n, TEST_SIZE), seed)}
    prompts |= {p.prompt for p in validation_set(val_n_per_hop, seed=seed)}
    return frozenset(prompts)


def train_hops_for(step: int, max_hops: int, curriculum_steps: int) -> int:
    """The hardest hop count allowed at `step`: the curriculum opens one hop at a time."""
    if curriculum_steps <= 0:
        return max_hops
    return min(max_hops, 1 + step * max_hops // max(1, curriculum_steps))


def train_batch(step: int, batch_size: int, seed: int = 0, max_hops: int = 5, curriculum_steps: int = 0,
                exclude: frozenset[str] = frozenset(), rank: int = 0, one_hop_count: bool = False,
                cap: int | None = None, hop_weights: list[float] | None = None) -> list[Problem]:
    """A deterministic training batch: a pure function of (seed, step, rank, cap, hop_weights), so resume is exact.
    Hop counts are uniform over 1..(curriculum cap), with the newest hop count drawn twice as often;
    per problem, or (one_hop_count) once per batch: then the batch runs hops + 1 loops instead of the
    longest problem's, which on average over 1-5 hops is 4 loops instead of 6.
    cap: the hardest hop count, when a curriculum object decides it (default: the fixed schedule);
    hop_weights: the relative frequency of hop counts 1..cap (default: as above)."""
    rng = random.Random(f"rlf-train:{seed}:{rank}:{step}")
    if cap is None:
        cap = train_hops_for(step, max_hops, curriculum_steps)
    elif not 1 <= cap <= max_hops:
        raise LabError(f"curriculum cap must be in 1..{max_hops}, got {cap}")
    weights = [1.0] * (cap - 1) + [2.0 if cap > 1 and cap < max_hops else 1.0]
    if hop_weights is not None:
        if len(hop_weights) != cap or not all(w >= 0 for w in hop_weights) or not sum(hop_weights) > 0:
            raise LabError(f"hop_weights must be {cap} non-negative numbers (hops 1..{cap}), not all 0; "
                           f"got {hop_weights}")
        weights = list(hop_weights)
    batch_hops = rng.choices(range(1, cap + 1), weights)[0] if one_hop_count else None
    out = []
    while len(out) < batch_size:
        p = make_problem(rng, batch_hops or rng.choices(range(1, cap + 1), weights)[0])
        if p.prompt not in exclude:
            out.append(p)
    return out


def shuffled_supervision(problems: list[Problem], seed: int) -> list[Problem]:
    """A control: each problem keeps its prompt but gets the target path of another problem with the
    same hop count (the supervision carries no information about the prompt)."""
    rng = random.Random(f"rlf-shuffle:{seed}")
    by_hops: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        by_hops.setdefault(p.hops, []).append(i)
    out = list(problems)
    for idx in by_hops.values():
        perm = idx[:]
        rng.shuffle(perm)
        for i, j in zip(idx, perm):
            out[i] = Problem(problems[i].prompt, problems[i].query, problems[j].path, problems[i].hops,
                             problems[i].n_distractors)
    return out


class Vocab:
    """Token ids the task needs, checked to be single tokens in the base's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        halt = tokenizer.convert_tokens_to_ids(HALT)
        if halt is None or halt == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(halt) != HALT:
            raise LabError(f"the base's tokenizer has no {HALT!r} token; RLF needs the lab tokenizer "
                           f"(or a tokenizer with {HALT!r} added as a special token)")
        self.halt_id = int(halt)
        self.word_id = {w: single_token_id(tokenizer, w) for w in [*VARIABLE_NAMES, *VALUE_WORDS]}
        self.id_word = {i: w for w, i in self.word_id.items()}
        self.id_word[self.halt_id] = HALT
        self.name_ids = torch.tensor([self.word_id[w] for w in VARIABLE_NAMES])
        self.value_ids = torch.tensor([self.word_id[w] for w in VALUE_WORDS])

    def targets(self, problems: list[Problem], n_loops: int) -> torch.Tensor:
        """(B, n_loops) target ids: path[k], then HALT for every later loop (the batch's longest)."""
        out = torch.full((len(problems), n_loops), self.halt_id, dtype=torch.long)
        for i, p in enumerate(problems):
            ids = [self.word_id[w] for w in p.path][:n_loops]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, token_id: int) -> str:
        if token_id in self.id_word:
            return self.id_word[token_id]
        return self.tokenizer.decode([token_id]).strip() or repr(self.tokenizer.decode([token_id]))


def parse_prompt(prompt: str) -> dict:
    """Check a typed prompt and recover its chain: a LabError names what is wrong.

    Returns {"assignments": {name: rhs}, "query": name, "path": [...] or None}; path is None when the
    chain is cyclic or ends at an undefined name (then no ground truth exists)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise LabError("expected a non-empty prompt string")
    if not prompt.endswith(ANSWER_MARKER):
        marker = ANSWER_MARKER.replace("\n", "\\n")
        raise LabError(f"the prompt must end with the answer marker {marker!r} (got ...{prompt[-20:]!r}); "
                       f"RLF reads its logits at that ':'")
    body = prompt[: -len(ANSWER_MARKER)].strip()
    if "What is " not in body or not body.endswith("?"):
        raise LabError(f"the prompt must ask 'What is X?' just before the answer marker, got {body[-30:]!r}")
    head, _, q = body.rpartition("What is ")
    query = q[:-1].strip()
    assignments: dict[str, str] = {}
    for sent in [s.strip() for s in head.split(".") if s.strip()]:
        if "=" not in sent:
            raise LabError(f"expected assignments like 'K = walnut.', got {sent!r}")
        lhs, rhs = (x.strip() for x in sent.split("=", 1))
        if lhs not in VARIABLE_NAMES:
            raise LabError(f"{lhs!r} is not a variable name the task uses (expected one of {', '.join(VARIABLE_NAMES[:8])}, ...)")
        if rhs not in VARIABLE_NAMES and rhs not in VALUE_WORDS:
            raise LabError(f"{rhs!r} (in {sent!r}) is neither a variable name nor a value word of the task")
        assignments[lhs] = rhs
    if query not in assignments:
        raise LabError(f"the queried variable {query!r} is not defined in the prompt "
                       f"(defined: {', '.join(sorted(assignments)) or 'none'})")
    path, cur, seen = [], query, {query}
    while cur in assignments:
        cur = assignments[cur]
        path.append(cur)
        if cur in VALUE_WORDS:
            return {"assignments": assignments, "query": query, "path": path}
        if cur in seen:
            return {"assignments": assignments, "query": query, "path": None}
        seen.add(cur)
    return {"assignments": assignments, "query": query, "path": None}


# --- length-fair extrapolation --------------------------------------------------------------------

def prompt_lengths(tokenizer, problems: list[Problem]) -> list[int]:
    """Token count of each prompt (as `Base.encode` tokenizes it)."""
    return [len(tokenizer.encode(p.prompt, add_special_tokens=False)) for p in problems]


def training_length_range(tokenizer, max_hops: int, seed: int = 0, n: int = 2048) -> tuple[int, int]:
    """(shortest, longest) prompt in tokens over n training problems of 1..max_hops hops (the training stream
    itself, every hop count open): the lengths the method was trained on."""
    probs = train_batch(0, n, seed, max_hops)
    lens = prompt_lengths(tokenizer, probs)
    return min(lens), max(lens)


def length_controlled_set(hops: int, n: int, tokenizer, seed: int = 0, min_len: int = 0, max_len: int | None = None,
                          distractors: tuple[int, int] = DISTRACTORS, tries: int = 50) -> list[Problem]:
    """Up to n distinct `hops`-hop problems whose prompt length in tokens lies in [min_len, max_len], drawn with
    `distractors` (inclusive range of distractor chains) from a seed stream of their own ("rlf-length:..."),
    never a test, validation or training stream. Long chains held to a short length take few distractors; short
    chains padded to a long length take many. Fewer than n when the range is hard to reach in n * tries draws."""
    if min_len < 0 or (max_len is not None and max_len < min_len):
        raise LabError(f"length range must be 0 <= min_len <= max_len, got [{min_len}, {max_len}]")
    lo, hi = distractors
    if not 1 <= lo <= hi:
        raise LabError(f"distractors must be an inclusive range with 1 <= low <= high, got {distractors}")
    rng = random.Random(f"rlf-length:{seed}:{hops}:{min_len}:{max_len}:{lo}:{hi}")
    seen, out = set(), []
    for _ in range(n * tries):
        if len(out) >= n:
            break
        p = make_problem(rng, hops, rng.randint(lo, hi))
        if p.prompt in seen:
            continue
        length = len(tokenizer.encode(p.prompt, add_special_tokens=False))
        if length >= min_len and (max_len is None or length <= max_len):
            seen.add(p.prompt)
            out.append(p)
    return out
