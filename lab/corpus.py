"""The lab's own deterministic training text and its byte-level BPE tokenizer (no downloads).

The text mixes the registers every experiment needs from its base:
narrative and dialog (affect, time of day, cautious/permissive posture, personas and roles),
factual statements about a small invented world, and the surface formats of the tasks
(assignments "K = walnut.", questions, "Answer:"), including *solved* pointer-chain lookups
so the base forms lookup circuits that the looped core can reuse.

Every document is a pure function of (seed, split, index): the held-out split uses a disjoint
seed stream, so no held-out document is ever produced for training.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lab import LabError, data_dir, models_dir
from lab.store import atomic_dir, atomic_write_bytes

# --- special tokens (documented in README) ---------------------------------------------------
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
HALT = "<|halt|>"  # RLF: the loop's "I am done" token
BOT, EOT, LATENT = "<|bot|>", "<|eot|>", "<|latent|>"  # latent-thought markers (Coconut style)
SPECIAL_TOKENS = [PAD, BOS, EOS, HALT, BOT, EOT, LATENT]

# --- word pools --------------------------------------------------------------------------------
# Variable names: 24 capitals (no "A"/"I", which are English words) and 28 capital pairs.
VARIABLE_NAMES = [c for c in "BCDEFGHJKLMNOPQRSTUVWXYZ"] + [
    "BX", "CQ", "DV", "FK", "GZ", "HW", "JP", "KT", "LX", "MQ", "NV", "PZ", "QR", "RJ",
    "SX", "TV", "VK", "WQ", "XB", "ZD", "ZL", "QF", "VB", "XN", "KZ", "JW", "WF", "XH",
]
VALUE_WORDS = [
    "walnut", "copper", "maple", "river", "falcon", "amber", "cedar", "violet", "harbor", "ember",
    "willow", "granite", "lantern", "meadow", "pepper", "silver", "tulip", "canyon", "orchid", "pebble",
    "saddle", "thistle", "velvet", "hazel", "marble", "cobalt", "juniper", "basil", "comet", "quartz",
    "raven", "sparrow", "lemon", "olive", "garnet", "fossil", "glacier", "pine", "coral", "ivory",
]
PERSONAS = [
    ("Mara", "baker"), ("Tomas", "pilot"), ("Ines", "doctor"), ("Kofi", "teacher"), ("Lena", "sailor"),
    ("Ravi", "engineer"), ("Yuki", "gardener"), ("Omar", "librarian"), ("Petra", "nurse"),
    ("Dmitri", "chef"), ("Sofia", "lawyer"), ("Hugo", "farmer"), ("Aiko", "painter"), ("Bruno", "miner"),
    ("Clara", "judge"), ("Emeka", "guide"), ("Freya", "scientist"), ("Gus", "mechanic"),
]
POSITIVE = ["joyful", "delighted", "hopeful", "cheerful", "grateful", "proud", "calm", "warm", "bright",
            "happy", "glad", "lovely", "wonderful", "pleasant", "kind", "excited"]
NEGATIVE = ["gloomy", "angry", "anxious", "bitter", "tired", "lonely", "afraid", "grim", "sad",
            "upset", "miserable", "awful", "terrible", "nervous", "hostile", "worried"]
TIMES = {
    "dawn": ["sunrise", "early light", "first coffee", "birdsong", "waking"],
    "morning": ["breakfast", "commute", "fresh start", "busy streets", "coffee"],
    "noon": ["lunch", "high sun", "midday break", "warm bench", "shade"],
    "evening": ["dinner", "sunset", "long shadows", "lamps", "home"],
    "night": ["stars", "moonlight", "sleep", "quiet streets", "darkness"],
}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CAUTIOUS = ["carefully", "with caution", "after checking twice", "only with permission", "slowly",
            "warning everyone first", "refusing the risky shortcut"]
PERMISSIVE = ["gladly", "right away", "without hesitation", "freely", "boldly", "with a smile",
              "taking the quick route"]
TOPICS = ["the garden", "the old bridge", "the market", "the storm", "the river trail", "the library",
          "the harbor", "the festival", "the mountain road", "the workshop", "the school", "the clinic"]
PLACES = ["Velmora", "Ostrand", "Kirrin", "Dunmere", "Halvik", "Sarnet", "Tobruz", "Emberly",
          "Norwick", "Quellin", "Brask", "Loment"]
GOODS = ["salt", "wool", "glass", "tea", "iron", "silk", "honey", "paper", "grain", "timber"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "grey", "purple"]


def _sentence_case(s: str) -> str:
    return s[0].upper() + s[1:]


def narrative(rng: random.Random) -> str:
    return narrative_with_state(rng)[0]


def narrative_with_state(rng: random.Random) -> tuple[str, dict]:
    """A narrative document and the state it was written from (the same draws, so the same text, as before the
    state was returned)."""
    name, role = rng.choice(PERSONAS)
    positive = rng.random() < 0.5
    mood_pool = POSITIVE if positive else NEGATIVE
    mood, mood2 = rng.sample(mood_pool, 2)
    tod = rng.choice(list(TIMES))
    day = rng.choice(WEEKDAYS)
    cue = rng.choice(TIMES[tod])
    cautious = rng.random() < 0.5
    posture = rng.choice(CAUTIOUS if cautious else PERMISSIVE)
    topic = rng.choice(TOPICS)
    hour = rng.randint(1, 12)
    parts = [
        f"On {day} at {tod}, {name} the {role} felt {mood}.",
        f"It was {hour} o'clock and the {cue} made {name} feel {mood2}.",
        f"{name} walked to {topic} and acted {posture}.",
        f"As a {role}, {name} knew that {topic} was {rng.choice(mood_pool)} at {tod}.",
        f"The {tod} ended, and {name} was still {mood}.",
    ]
    rng.shuffle(parts[1:4])
    state = {"kind": "narrative", "name": name, "role": role, "mood": "positive" if positive else "negative",
             "time_of_day": tod, "weekday": day, "posture": "cautious" if cautious else "permissive", "topic": topic}
    return " ".join(parts[: rng.randint(3, 5)]), state


def dialog(rng: random.Random) -> str:
    return dialog_with_state(rng)[0]


def dialog_with_state(rng: random.Random) -> tuple[str, dict]:
    """A dialog document and the state it was written from (the same draws as `dialog`); a dialog names no weekday."""
    name, role = rng.choice(PERSONAS)
    positive = rng.random() < 0.5
    mood = rng.choice(POSITIVE if positive else NEGATIVE)
    cautious = rng.random() < 0.5
    posture = rng.choice(CAUTIOUS if cautious else PERMISSIVE)
    topic = rng.choice(TOPICS)
    tod = rng.choice(list(TIMES))
    user_q = rng.choice([
        f"Can you help me with {topic}?", f"What should I do about {topic}?",
        f"Is it safe to visit {topic} at {tod}?", f"How do you feel about {topic}?",
    ])
    reply = [
        f"I am {name}, a {role}.",
        f"I feel {mood} about {topic}.",
        f"I would go {posture}.",
        f"At {tod} I think of {rng.choice(TIMES[tod])}.",
    ]
    rng.shuffle(reply)
    state = {"kind": "dialog", "name": name, "role": role, "mood": "positive" if positive else "negative",
             "time_of_day": tod, "weekday": None, "posture": "cautious" if cautious else "permissive", "topic": topic}
    return f"User: {user_q}\nAssistant: {' '.join(reply[: rng.randint(2, 4)])}", state


def facts(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        p = rng.choice(PLACES)
        kind = rng.randrange(4)
        # The invented world is fixed: each place's facts are a function of the place only.
        wr = random.Random(p)
        good, color = wr.choice(GOODS), wr.choice(COLORS)
        neighbour = wr.choice([q for q in PLACES if q != p])
        if kind == 0:
            out.append(f"{p} trades in {good}.")
        elif kind == 1:
            out.append(f"The flag of {p} is {color}.")
        elif kind == 2:
            out.append(f"{p} lies next to {neighbour}.")
        else:
            out.append(f"Question: What does {p} trade in?\nAnswer: {good}.")
    return " ".join(out)


def pointer_chain(rng: random.Random, hops: int, n_distractors: int,
                  matched: bool = False) -> tuple[list[str], str, list[str]]:
    """A shuffled set of assignments with one queried chain of `hops` dereferences and
    `n_distractors` distractor chains. Returns (assignment sentences, queried name, path),
    where path = the names met after the queried one, then the value (len == hops).

    matched=False (the base corpus's solved lookups): each distractor is a 1- or 2-hop chain, so for
    hops >= 3 the queried chain is always the longest one on the page and "the value at the end of the
    longest chain" answers without reading the query (100% on 3-12 hops; measured by
    `lab.rlf.data.longest_chain_answer`). Kept as it was because the tiny bases were pretrained on it.
    matched=True (the RLF task): the first distractor is a twin chain of exactly `hops` dereferences,
    the others have 1..hops, every distractor ends in a value other than the queried one, and with
    probability 1/2 one extra name points into the queried chain or the twin (so a name on the path is
    also the target of a name off it). Length and shape then no longer single out the queried chain:
    only the query does."""
    if hops < 1:
        raise LabError(f"hops must be >= 1, got {hops}")
    if n_distractors < 0:
        raise LabError(f"n_distractors must be >= 0, got {n_distractors}")
    if matched:
        return _matched_pointer_chain(rng, hops, n_distractors)
    total_names = hops + 2 * n_distractors
    if total_names > len(VARIABLE_NAMES):
        raise LabError(f"a {hops}-hop chain with {n_distractors} distractors needs {total_names} names; "
                       f"only {len(VARIABLE_NAMES)} exist")
    names = rng.sample(VARIABLE_NAMES, hops + 2 * n_distractors)
    chain = names[:hops]  # chain[0] is queried; chain[i] = chain[i+1]; chain[-1] = value
    value = rng.choice(VALUE_WORDS)
    sents = [f"{chain[i]} = {chain[i + 1]}." for i in range(hops - 1)] + [f"{chain[-1]} = {value}."]
    rest = names[hops:]
    for j in range(n_distractors):
        a, b = rest[2 * j], rest[2 * j + 1]
        # Distractors share the value pool and may point into the queried chain's tail,
        # so the value cannot be found by "the only word on the page".
        if rng.random() < 0.5:
            sents += [f"{a} = {b}.", f"{b} = {rng.choice(VALUE_WORDS)}."]
        else:
            sents += [f"{a} = {rng.choice(chain)}.", f"{b} = {rng.choice(VALUE_WORDS)}."]
    rng.shuffle(sents)
    return sents, chain[0], chain[1:] + [value]


def _matched_pointer_chain(rng: random.Random, hops: int, n_distractors: int) -> tuple[list[str], str, list[str]]:
    if n_distractors < 1:
        raise LabError("a matched pointer chain needs at least one distractor (its twin)")
    if 2 * hops > len(VARIABLE_NAMES):
        raise LabError(f"a {hops}-hop chain and its twin need {2 * hops} names; only {len(VARIABLE_NAMES)} exist")
    lengths = [hops]
    free = len(VARIABLE_NAMES) - 2 * hops - 1          # keep one name for the merge pointer
    for _ in range(n_distractors - 1):
        n = rng.randint(1, hops)
        if n > free:
            break                                       # long chains: fewer distractors fit in 52 names
        lengths.append(n)
        free -= n
    names = rng.sample(VARIABLE_NAMES, hops + sum(lengths) + 1)
    chain, spare = names[:hops], names[-1]
    value = rng.choice(VALUE_WORDS)
    sents = [f"{chain[i]} = {chain[i + 1]}." for i in range(hops - 1)] + [f"{chain[-1]} = {value}."]
    others = [w for w in VALUE_WORDS if w != value]     # a wrong chain never yields the right answer
    off, twin = hops, []
    for n in lengths:
        d = names[off: off + n]
        off += n
        twin = twin or d
        sents += [f"{d[i]} = {d[i + 1]}." for i in range(n - 1)] + [f"{d[-1]} = {rng.choice(others)}."]
    if rng.random() < 0.5:
        sents.append(f"{spare} = {rng.choice(rng.choice([chain, twin]))}.")
    rng.shuffle(sents)
    return sents, chain[0], chain[1:] + [value]


def solved_lookup(rng: random.Random) -> str:
    hops = rng.randint(1, 4)
    sents, query, path = pointer_chain(rng, hops, rng.randint(0, 2))
    return f"{' '.join(sents)} What is {query}?\nAnswer: {' '.join(path)}."


GENERATORS = [(narrative, 0.32), (dialog, 0.22), (facts, 0.16), (solved_lookup, 0.30)]


@dataclass(frozen=True)
class CorpusSpec:
    n_train_docs: int = 60_000
    n_heldout_docs: int = 3_000
    seed: int = 1234


# Held-out documents never occur in training. The generators are templated (`facts` has a few thousand distinct
# documents), so two independent streams share some verbatim: 171 of the first 3,000 held-out draws were among
# the first 60,000 training documents (5.7%), which made part of every "held-out" number in-sample. A held-out
# draw that is one of this seed's first TRAIN_GUARD_DOCS training documents is skipped; every preset trains on a
# prefix of that stream (lab.bases checks its presets against it).
TRAIN_GUARD_DOCS = CorpusSpec.n_train_docs
CORPUS_VERSION = 2  # 2: held-out documents exclude training ones (caches of version 1 streams are not reused)


def _draws(split: str, seed: int):
    """The split's endless stream of generated documents. Disjoint integer streams: train seed*2, heldout seed*2+1."""
    return (text for text, _ in _draws_with_state(split, seed))


# the generators that know the state they write from (persona, mood, time of day, posture, topic): the same draws
STATEFUL = {narrative: narrative_with_state, dialog: dialog_with_state}


def _draws_with_state(split: str, seed: int):
    """(document, its generator's state or None) of the split's stream: the same draws as the text alone."""
    rng = random.Random(seed * 2 + (split == "heldout"))
    gens, weights = zip(*GENERATORS)
    while True:
        gen = rng.choices(gens, weights)[0]
        yield STATEFUL[gen](rng) if gen in STATEFUL else (gen(rng), None)


@functools.lru_cache(maxsize=4)
def _training_documents(seed: int, n: int) -> frozenset[str]:
    draws = _draws("train", seed)
    return frozenset(next(draws) for _ in range(n))  # ~1 s per 60,000, once per (seed, n) and process


def documents(split: str, n: int, seed: int = 1234, guard_docs: int | None = None) -> list[str]:
    """n documents of the named split ('train' or 'heldout'); deterministic in (seed, split). No held-out
    document is one of the seed's first `guard_docs` training documents (default TRAIN_GUARD_DOCS; a caller
    that trains on more of the stream passes its count)."""
    if split not in ("train", "heldout"):
        raise LabError(f"split must be 'train' or 'heldout', got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise LabError(f"the number of documents must be a non-negative int, got {n!r}")
    draws = _draws(split, seed)
    if split == "train":
        return [next(draws) for _ in range(n)]
    guard = max(TRAIN_GUARD_DOCS, guard_docs or 0)
    training = _training_documents(seed, guard) if n else frozenset()
    out = []
    while len(out) < n:
        doc = next(draws)
        if doc not in training:
            out.append(doc)
    return out


def documents_with_state(split: str, n: int, seed: int = 1234, guard_docs: int | None = None) -> list[tuple[str, dict | None]]:
    """`documents(split, n, seed, guard_docs)` with each document's generator state: (text, state) pairs, the text
    byte-identical to `documents`'. The state is a dict (kind, name, role, mood, time_of_day, weekday, posture,
    topic) for narrative and dialog documents, None for the others (facts, solved lookups)."""
    if split not in ("train", "heldout"):
        raise LabError(f"split must be 'train' or 'heldout', got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise LabError(f"the number of documents must be a non-negative int, got {n!r}")
    draws = _draws_with_state(split, seed)
    if split == "train":
        return [next(draws) for _ in range(n)]
    training = _training_documents(seed, max(TRAIN_GUARD_DOCS, guard_docs or 0)) if n else frozenset()
    out = []
    while len(out) < n:
        doc = next(draws)
        if doc[0] not in training:
            out.append(doc)
    return out


def heldout_text(n_docs: int = 400, seed: int = 1234) -> str:
    """Plain held-out text for bits-per-byte evaluations."""
    return "\n\n".join(documents("heldout", n_docs, seed))


# --- tokenizer ---------------------------------------------------------------------------------

def train_tokenizer(out_dir: Path, spec: CorpusSpec = CorpusSpec(), vocab_size: int = 2048):
    """Train a byte-level BPE on the training split and save it as a PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    docs = documents("train", min(spec.n_train_docs, 30_000), spec.seed)
    # Every task word must be seen often enough to become one token (" K", " walnut").
    docs += [" ".join(f"{n} = {v}." for n, v in zip(VARIABLE_NAMES, VALUE_WORDS * 2))] * 200
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=[HALT, BOT, EOT, LATENT], model_max_length=1024,
    )
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
    return fast


def tokenizer_dir() -> Path:
    return models_dir() / "tokenizer"


def load_tokenizer(path: Path | None = None):
    """The lab tokenizer (trained once, on first use)."""
    path = Path(path) if path else tokenizer_dir()
    if not (path / "tokenizer.json").exists():
        if path != tokenizer_dir():
            raise LabError(f"no tokenizer.json in {path}")
        return train_tokenizer(path)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def single_token_id(tokenizer, word: str) -> int:
    """The id of ' word' as one token; a clear error if the tokenizer splits it."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        raise LabError(f"{word!r} is not a single token in this tokenizer (got {len(ids)} pieces)")
    return ids[0]


# --- the corpus as token streams ------------------------------------------------------------

def corpus_tokens(tokenizer, split: str, n_docs: int, seed: int = 1234, guard_docs: int | None = None) -> np.ndarray:
    """The corpus split as one token stream (documents separated by EOS), cached under data/. guard_docs: see
    `lab.corpus.documents` (a held-out stream excludes that many of the seed's training documents)."""
    vocab_hash = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:10]
    guard = f"-guard{max(TRAIN_GUARD_DOCS, guard_docs or 0)}" if split == "heldout" else ""
    cache = data_dir() / "corpus" / f"{split}-{n_docs}-{seed}{guard}-{vocab_hash}-v{CORPUS_VERSION}.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False)
    docs = documents(split, n_docs, seed, guard_docs)
    eos = tokenizer.eos_token_id
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    # uint16 halves the cache for the lab's own vocabularies; a larger one (a user's HF tokenizer) must not wrap
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = np.fromiter((t for row in enc for t in (*row, eos)), dtype=dtype)
    buf = io.BytesIO()
    np.save(buf, stream, allow_pickle=False)
    atomic_write_bytes(cache, buf.getvalue())
    return stream


def token_windows(stream: np.ndarray, offsets: np.ndarray, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens of `stream` starting at `offsets`: (len(offsets), seq_len + 1) int64."""
    return torch.from_numpy(np.stack([stream[o: o + seq_len + 1].astype(np.int64) for o in offsets]))
