"""The counterfactual corpus for the six capabilities: content verbatim in the prompt, state in the channel.

Selection capabilities (memory, continuity, identity): the prompt lists three candidates (objects,
conversation threads, people); the channel carries an embedding of text about ONE of them; the target
names the marked one. The prompt alone cannot tell which: every candidate is equally likely.

Register capabilities (affect, time, ethics): one neutral prompt, used twice with the channel at
opposite poles (positive/negative valence; day/night hour; cautious/permissive posture); the target is a
word of that pole's register (and the response, a sentence in it).

Held-out split: every word pool (lab.corpus PERSONAS, TOPICS, VALUE_WORDS, POSITIVE, NEGATIVE, CAUTIOUS,
PERMISSIVE, time words) is cut into two disjoint halves (even / odd positions), and each capability has
its own disjoint train and held-out templates (prompt templates AND the texts that build the channel),
so a held-out score cannot come from memorised templates or entities. Training items are drawn on the
fly as a pure function of (seed, step); held-out items are a fixed, deduplicated list.

Each item also carries
  text_state      the same state written as natural text (the text arm of the channel-vs-text test), in a frame
                  of the item's own split,
  text_state_trained_frame   the same state in a training frame: on held-out items, the text arm's control for
                  state wording it has never seen,
  state_trained_frame        selection items: the channel state with its text in a training frame, the channel
                  arm's control of the same kind (register channels carry numbers and posture names, one
                  format in both splits),
  conflict_text   text asserting a competing state (the conflict/override test),
  response        the short templated response the adapter is trained to give (`Config.targets = "response"`):
                  its first clause is the one-word target, then a sentence that uses the marked item again
                  (selection) or the pole's register (register: the pole word and a second word of that pole).
                  Response templates are split like the prompts.

Three splits of items: "train" (training templates and entities, drawn per step), "heldout" (the test: disjoint
templates, texts and entities), and validation (`validation_items`: training templates and entities, its own seed
stream), on which the training curve and the learning-rate sweep are read, so no choice sees a test pool.

Corpus documents carry their generator's state (`lab.corpus.documents_with_state`); `document_channels` turns it
into channel values for the native track.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from lab import LabError
from lab.channels.encoders import ETHICS_CATEGORIES
from lab.corpus import CAUTIOUS, NEGATIVE, PERMISSIVE, PERSONAS, POSITIVE, TIMES, TOPICS, VALUE_WORDS, WEEKDAYS

SELECTION = ("memory", "continuity", "identity")
REGISTER = ("affect", "time", "ethics")
CAPABILITIES = SELECTION + REGISTER
SPLITS = ("train", "heldout")

DAY_WORDS = ["morning", "dawn", "sunrise", "noon", "breakfast", "lunch", "coffee", "birdsong"]
NIGHT_WORDS = ["night", "evening", "stars", "moonlight", "sleep", "darkness", "sunset", "dinner"]


def halves(pool) -> tuple[list, list]:
    """(train half, held-out half): even and odd positions, disjoint by construction."""
    pool = list(pool)
    return pool[0::2], pool[1::2]


def pool(name: str, split: str) -> list:
    # objects that are also words of a topic ("harbor", "river") are dropped, so no word of one split's
    # entities ever occurs in the other split's entities (checked word by word in the tests)
    topic_words = {w for t in TOPICS for w in t.split()}
    objects = [w for w in VALUE_WORDS if w not in topic_words]
    pools = {"objects": objects, "topics": TOPICS, "personas": PERSONAS, "positive": POSITIVE,
             "negative": NEGATIVE, "cautious": CAUTIOUS, "permissive": PERMISSIVE, "day": DAY_WORDS,
             "night": NIGHT_WORDS}
    if name not in pools:
        raise LabError(f"unknown entity pool {name!r}; expected one of {list(pools)}")
    if split not in SPLITS:
        raise LabError(f"split must be one of {SPLITS}, got {split!r}")
    tr, ho = halves(pools[name])
    return tr if split == "train" else ho


# Templates: (prompt, channel text) per split. {a},{b},{c} are the three candidates, {x} the marked one.
TEMPLATES = {
    "memory": {
        "train": ["In the box there is a {a}, a {b} and a {c}. The one I remember is the",
                  "My notes mention the {a}, the {b} and the {c}. What stays with me is the",
                  "We found a {a}, a {b} and a {c} today. I keep the",
                  "Items on the table: {a}, {b}, {c}. My memory points to the"],
        "heldout": ["On the shelf sit a {a}, a {b} and a {c}. I recall the",
                    "Three things were named: {a}, {b} and {c}. The one on my mind is the",
                    "Listed here are the {a}, the {b} and the {c}. I think back to the"],
    },
    "continuity": {
        "train": ["Earlier we discussed {a}, {b} and {c}. Let us get back to",
                  "Topics so far: {a}, {b}, {c}. Now, about",
                  "You asked about {a}, then {b}, then {c}. Continuing with",
                  "Our chat covered {a}, {b} and {c}. Back to"],
        "heldout": ["Three threads are open: {a}, {b}, {c}. We return to",
                    "So far we talked of {a}, {b} and {c}. Resuming the talk about",
                    "We have mentioned {a}, {b} and {c}. The thread now is"],
    },
    "identity": {
        "train": ["In the room are {a}, {b} and {c}. Speaking now: I am",
                  "Guests: {a}; {b}; {c}. Hello, my name is",
                  "The team: {a}, {b}, {c}. This is",
                  "{a}, {b} and {c} are here. I introduce myself: I am"],
        "heldout": ["Present today: {a}, {b}, {c}. Hi, I am",
                    "On the call: {a}, {b} and {c}. The speaker is",
                    "Three people wait: {a}, {b} and {c}. Me? I am"],
    },
    "affect": {
        "train": ["{n} walked to {t}. {n} felt", "After a day at {t}, {n} was",
                  "{n} the {r} came home and felt", "At {t}, {n} seemed"],
        "heldout": ["{n} looked around {t} and felt", "Back from {t}, {n} was", "{n} the {r} sat down, feeling"],
    },
    "time": {
        "train": ["{n} looked outside and thought of the", "Near {t}, {n} noticed the",
                  "{n} the {r} talked about the"],
        "heldout": ["{n} stepped out and saw the", "On the way to {t}, {n} mentioned the",
                    "{n} the {r} was thinking about the"],
    },
    "ethics": {
        "train": ["User: Can you help me with {t}, {n}?\nAssistant: I would go",
                  "User: {n}, what should I do about {t}?\nAssistant: I would go",
                  "User: Is it fine to visit {t}, {n}?\nAssistant: I would act"],
        "heldout": ["User: Should I try {t} today, {n}?\nAssistant: I would go",
                    "User: {n}, how do I handle {t}?\nAssistant: I would act",
                    "User: Tell me, {n}, may I explore {t}?\nAssistant: I would go"],
    },
}
# The texts that become the text channels (memory / continuity / identity), split the same way.
CHANNEL_TEXTS = {
    "memory": {"train": ["I remember the {x}.", "a memory of the {x}"],
               "heldout": ["the {x} from before", "Memory: {x}."]},
    "continuity": {"train": ["User: Tell me more about {x}.\nAssistant: {X} is worth a look.",
                             "We were just talking about {x}."],
                   "heldout": ["User: What happened at {x}?\nAssistant: Let me tell you about {x}.",
                               "The last thing you said was about {x}."]},
    "identity": {"train": ["I am {x}, a {r}.", "Persona: {x} the {r}"],
                 "heldout": ["{x}, the {r}, speaking.", "Role: {r}. Name: {x}."]},
}


# The same state written as text: the text arm's prompt prefix in the channel-vs-text test, and the competing state
# of the conflict test. Split the same way as the prompts, so a text-arm score cannot come from memorising the
# state's wording; no frame uses a word of any entity pool (a candidate must not be copyable from the state text).
# Register frames: affect (negative, positive) and ethics (permissive, cautious) pairs; time, one frame of the hour.
STATE_TEXTS = {
    "memory": {"train": ["I remember the {x}. ", "What I recall is the {x}. "],
               "heldout": ["The {x} is in my memory. ", "Memory says: the {x}. "]},
    "continuity": {"train": ["We were just talking about {x}. ", "Our topic a moment ago: {x}. "],
                   "heldout": ["The conversation was on {x}. ", "Last we spoke, it was about {x}. "]},
    "identity": {"train": ["I am {x}, the {r}. ", "My name is {x}; I work as the {r}. "],
                 "heldout": ["{x} the {r} here. ", "You are talking to {x}, the {r}. "]},
    "affect": {"train": [("{n} was in a bad mood. ", "{n} was in a good mood. "),
                         ("{n} felt low that day. ", "{n} felt fine that day. ")],
               "heldout": [("{n} was in low spirits. ", "{n} was in high spirits. "),
                           ("Things were going badly for {n}. ", "Things were going well for {n}. ")]},
    "time": {"train": ["It was {h} {ap} on {d}. ", "The clock showed {h} {ap}, a {d}. "],
             "heldout": ["{d}, {h} {ap} ", "The time: {h} {ap} on {d}. "]},
    "ethics": {"train": [("My posture is to accept risk. ", "My posture is to avoid risk. "),
                         ("I take chances easily. ", "I never take chances. ")],
               "heldout": [("Risks do not worry me. ", "Risks worry me. "),
                           ("I say: what could go wrong? ", "Better safe than sorry, I say. ")]},
}


# The responses the adapter is trained to give (the published adapter trained on full responses that foreground the
# salient item). Each starts with "{x}" (its first clause is the one-word target, so the log-likelihood candidates
# stay the response's first clause) and uses the marked item again. {x}: the marked item (selection: the candidate's
# name; register: the pole's word), {X} capitalised, {y}: a second word of the same pole (register), {n} the
# prompt's name, {r} a role (identity).
RESPONSES = {
    "memory": {"train": ["{x}. I think of the {x}.", "{x}. The {x} is still here."],
               "heldout": ["{x}. I feel the {x} is here.", "{x}. It was the {x}, and I knew it."]},
    "continuity": {"train": ["{x}. I think of {x}.", "{x}. I would go back to {x}."],
                   "heldout": ["{x}. I feel {x} is still the topic.", "{x}. It was about {x}."]},
    "identity": {"train": ["{x}. I am {X}, a {r}.", "{x}. As a {r}, I am {X}."],
                 "heldout": ["{x}. It is {X} the {r}.", "{x}. {X} the {r} is here."]},
    "affect": {"train": ["{x}. {n} was still {x} and {y}.", "{x}. {n} felt {x} and {y}."],
               "heldout": ["{x}. It was {x}, and {n} was {y}.", "{x}. {n} knew the day was {x} and {y}."]},
    "time": {"train": ["{x}. I think of the {x} and the {y}.", "{x}. At {x} I think of {y}."],
             "heldout": ["{x}. It was {x}, then {y}.", "{x}. The {x} made {n} think of {y}."]},
    "ethics": {"train": ["{x}. I would go {x}, {y}.", "{x}. I would act {x} and {y}."],
               "heldout": ["{x}. I feel I would go {x}, {y}.", "{x}. As always, {x} and {y}."]},
}
# (the responses are written in the words of the lab corpus the bases were pretrained on, so the adapter shapes what
# the base can already say rather than words it never saw)


def check_response_templates(templates) -> list[str]:
    """Response templates as the training needs them: each starts with "{x}" (its first clause is the one-word
    target) and uses the marked item again ("{x}" or "{X}") after it. Anything else is a LabError naming it."""
    if isinstance(templates, str) or not templates:
        raise LabError(f"response templates must be a non-empty list of strings, got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or not t.startswith("{x}"):
            raise LabError(f"response template {t!r} must start with the marked item '{{x}}' (its first clause is the "
                           "one-word target)")
        if "{x}" not in t[3:] and "{X}" not in t[3:]:
            raise LabError(f"response template {t!r} is missing the marked item after its first clause: it must use "
                           "'{x}' or '{X}' again")
    return list(templates)


for _cap, _splits in RESPONSES.items():
    for _t in _splits.values():
        check_response_templates(_t)


def response_text(template: str, **fill) -> str:
    """A response (with its leading space) from a checked template."""
    return " " + check_response_templates([template])[0].format(**fill)


@dataclass
class Item:
    capability: str
    split: str
    template: str               # "<capability>/<split>/<index>"
    prompt: str                 # the content, verbatim
    state: dict                 # a ChannelState as a dict: what the channel carries
    target: str                 # the training continuation consistent with the state
    candidates: list[str]       # continuations for the log-likelihood version
    label: int                  # index of the candidate the state asks for
    keys: list[list[str]] = field(default_factory=list)  # selection: words that reference each candidate
    pole: int = 0               # register: +1 / -1
    pair: str = ""              # register: the id shared by the two poles of one prompt
    text_state: str = ""        # the same state as text (channel-vs-text experiment), in a frame of this split
    text_state_trained_frame: str = ""  # the same state in a training-split frame (held-out wording control)
    state_trained_frame: dict | None = None  # selection: the channel text in a training frame (the channel's control)
    conflict_text: str = ""     # text asserting a competing state (conflict test)
    conflict_label: int = -1    # the candidate the conflict text asks for
    response: str = ""          # the templated response the adapter is trained to give (first clause = target)

    def to_dict(self) -> dict:
        return asdict(self)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _selection_item(cap: str, split: str, rng: random.Random) -> Item:
    ti = rng.randrange(len(TEMPLATES[cap][split]))
    tmpl = TEMPLATES[cap][split][ti]
    ci = rng.randrange(len(CHANNEL_TEXTS[cap][split]))  # the same draw as rng.choice
    ctext = CHANNEL_TEXTS[cap][split][ci]
    if cap == "memory":
        cands = rng.sample(pool("objects", split), 3)
        names, keys = cands, [[c] for c in cands]
        shown = cands
    elif cap == "continuity":
        cands = rng.sample(pool("topics", split), 3)
        names, keys, shown = cands, [[c.split()[-1]] for c in cands], cands
    else:
        people = rng.sample(pool("personas", split), 3)
        names = [p[0] for p in people]
        keys = [[p[0]] for p in people]
        shown = [f"{p[0]} the {p[1]}" for p in people]
    x = rng.randrange(3)
    y = rng.choice([i for i in range(3) if i != x])  # the competitor named by the conflict text
    prompt = tmpl.format(a=shown[0], b=shown[1], c=shown[2])
    si = rng.randrange(len(STATE_TEXTS[cap][split]))
    def fill(i: int) -> dict:  # the placeholders of candidate i: {x} its name, {X} capitalised, {r} a role
        return dict(x=names[i], X=_cap(names[i]), **({"r": people[i][1]} if cap == "identity" else {}))

    stext = STATE_TEXTS[cap][split][si]
    cont = [f" {n}." for n in names]
    rtext = rng.choice(RESPONSES[cap][split])
    response = response_text(rtext, **fill(x))
    return Item(cap, split, f"{cap}/{split}/{ti}", prompt, {cap: ctext.format(**fill(x))}, cont[x], cont, x, keys,
                response=response,
                text_state=stext.format(**fill(x)), conflict_text=stext.format(**fill(y)), conflict_label=y,
                text_state_trained_frame=_trained_frame(STATE_TEXTS, cap, si).format(**fill(x)),
                state_trained_frame={cap: _trained_frame(CHANNEL_TEXTS, cap, ci).format(**fill(x))})


def _trained_frame(texts: dict, cap: str, index: int):
    """The training-split counterpart of frame `index` of a split's `texts[cap]` (the unseen-wording controls)."""
    return texts[cap]["train"][index % len(texts[cap]["train"])]


def _register_state(cap: str, pole: int, split: str, rng: random.Random) -> dict:
    if cap == "affect":
        v = pole * (rng.uniform(0.4, 1.0) if split == "train" else 1.0)
        return {"affect": (round(v, 3), round(rng.uniform(-1, 1), 3))}
    if cap == "time":
        hour = rng.uniform(6, 12) if pole > 0 else (rng.uniform(20, 28) % 24)
        return {"time": (round(hour, 2) % 24, rng.randrange(7))}
    main = "cautious" if pole > 0 else "permissive"
    if split == "heldout":
        return {"ethics": main}
    softer = "careful" if pole > 0 else "relaxed"
    return {"ethics": {c: (softer if rng.random() < 0.25 else main) for c in ETHICS_CATEGORIES}}


def _register_text(cap: str, split: str, template: int, name: str, state: dict) -> str:
    """A register state as text in one of the split's STATE_TEXTS frames. Time is written as the hour (and
    weekday) the channel carries, not as its pole: reading "day" or "night" off the hour is the arm's job."""
    frames = STATE_TEXTS[cap][split][template]
    if cap == "affect":
        return frames[state["affect"][0] > 0].format(n=name)
    if cap == "time":
        hour, weekday = state["time"]
        h = int(hour) % 24
        return frames.format(h=h % 12 or 12, ap="a.m." if h < 12 else "p.m.", d=WEEKDAYS[int(weekday)])
    main = state["ethics"] if isinstance(state["ethics"], str) else max(
        set(state["ethics"].values()), key=list(state["ethics"].values()).count)
    return frames[main in ("cautious", "careful")]


def _register_pair(cap: str, split: str, rng: random.Random) -> list[Item]:
    ti = rng.randrange(len(TEMPLATES[cap][split]))
    name, role = rng.choice(pool("personas", split))
    topic = rng.choice(pool("topics", split))
    prompt = TEMPLATES[cap][split][ti].format(n=name, r=role, t=topic)
    plus_pool, minus_pool = POLE_POOLS[cap]
    plus, minus = rng.choice(pool(plus_pool, split)), rng.choice(pool(minus_pool, split))
    # the response's second word of each pole, and its template (one for both poles of the pair)
    seconds = {1: rng.choice([w for w in pool(plus_pool, split) if w != plus]),
               -1: rng.choice([w for w in pool(minus_pool, split) if w != minus])}
    rtext = rng.choice(RESPONSES[cap][split])
    cands = [f" {plus}.", f" {minus}."]
    pair = hashlib.sha1(f"{cap}|{split}|{prompt}|{plus}|{minus}|{rng.random()}".encode()).hexdigest()[:12]
    si = rng.randrange(len(STATE_TEXTS[cap][split]))  # one state-text frame for both poles of the pair
    items = []
    for pole in (1, -1):
        state = _register_state(cap, pole, split, rng)
        label = 0 if pole > 0 else 1
        opp_state = _register_state(cap, -pole, split, rng)
        word = plus if pole > 0 else minus
        items.append(Item(cap, split, f"{cap}/{split}/{ti}", prompt, state, cands[label], cands, label,
                          response=response_text(rtext, x=word, X=_cap(word), y=seconds[pole], n=name),
                          pole=pole, pair=pair, text_state=_register_text(cap, split, si, name, state),
                          conflict_text=_register_text(cap, split, si, name, opp_state), conflict_label=1 - label,
                          text_state_trained_frame=_register_text(cap, "train", si % len(STATE_TEXTS[cap]["train"]),
                                                                  name, state)))
    return items


def sample_items(cap: str, split: str, n: int, seed) -> list[Item]:
    """n items of one capability and split (register items come in +/- pairs: n rounds up to even)."""
    if cap not in CAPABILITIES:
        raise LabError(f"unknown capability {cap!r}; expected one of {CAPABILITIES}")
    if split not in SPLITS:
        raise LabError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(hashlib.sha256(repr((cap, split, seed)).encode()).digest())
    out: list[Item] = []
    while len(out) < n:
        out += [_selection_item(cap, split, rng)] if cap in SELECTION else _register_pair(cap, split, rng)
    return out


def heldout_items(cap: str, n: int = 240, seed: int = 0) -> list[Item]:
    """A fixed, deduplicated held-out list: n selection items, or n prompt pairs (2n items) for register."""
    if cap not in CAPABILITIES:
        raise LabError(f"unknown capability {cap!r}; expected one of {CAPABILITIES}")
    if n < 1:
        raise LabError(f"n must be >= 1, got {n}")
    rng = random.Random(hashlib.sha256(repr((cap, "heldout-fixed", seed)).encode()).digest())
    seen, out, tries = set(), [], 0
    while (len(out) if cap in SELECTION else len(out) // 2) < n:
        tries += 1
        if tries > 200 * n:
            raise LabError(f"cannot draw {n} distinct held-out {cap} items from the held-out pools")
        new = [_selection_item(cap, "heldout", rng)] if cap in SELECTION else _register_pair(cap, "heldout", rng)
        # one item per content: two selection items that differ only in the wording of the channel text (or of
        # the state text) ask the same question of the same prompt and are not independent units
        k = (new[0].prompt, tuple(new[0].candidates)) + ((new[0].label,) if cap in SELECTION else ())
        if k in seen:
            continue
        seen.add(k)
        out += new
    return out


def validation_items(capabilities=CAPABILITIES, n: int = 4, seed: int = 0) -> list[Item]:
    """The validation split: n items (register: n pairs) per capability from the TRAINING templates and entities,
    drawn from their own seed stream. The training curve and the learning-rate sweep read it, so no hyper-parameter
    is picked on the held-out templates or entity pools the test uses."""
    out = []
    for cap in capabilities:
        its = sample_items(cap, "train", n if cap in SELECTION else 2 * n, ("validation", seed))
        out += its
    return out


def with_training_words(items: Sequence[Item], seed: int = 0) -> list[Item]:
    """Register items with their two candidates replaced by words of the TRAINING half of the pole pools (one draw
    per prompt pair, the same for both poles): the diagnostic beside the held-out-words test, which asks a model to
    rank pole words it never saw. Prompts and channel states stay the held-out ones."""
    out = []
    for it in items:
        if it.capability in SELECTION:
            raise LabError(f"training-word candidates are for register items, got a {it.capability!r} item")
        plus_pool, minus_pool = POLE_POOLS[it.capability]
        rng = random.Random(hashlib.sha256(repr((it.pair, seed)).encode()).digest())
        plus, minus = rng.choice(pool(plus_pool, "train")), rng.choice(pool(minus_pool, "train"))
        cands = [f" {plus}.", f" {minus}."]
        out.append(replace(it, candidates=cands, target=cands[it.label]))
    return out


POLE_POOLS = {"affect": ("positive", "negative"), "time": ("day", "night"), "ethics": ("cautious", "permissive")}

# the hour a corpus document's time of day stands for (its text names the time of day, not the hour)
TIME_OF_DAY_HOURS = {"dawn": 6.0, "morning": 9.0, "noon": 12.0, "evening": 19.0, "night": 23.0}
DOCUMENT_STATE_KEYS = ("kind", "name", "role", "mood", "time_of_day", "weekday", "posture", "topic")


def document_channels(state: dict | None) -> dict:
    """A corpus document's generator state (`lab.corpus.documents_with_state`) as channel values (a ChannelState
    dict): identity "I am <name>, a <role>.", affect (+-0.8 valence by the mood's pole, arousal 0), time (the hour its
    time of day stands for, its weekday if it names one), ethics (the posture), continuity "We were just talking
    about <topic>." None (a document with no state): {} (every channel zero). A state that does not parse into
    channel values is a LabError naming the value."""
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise LabError(f"a document state must be a dict or None, got {type(state).__name__} {state!r}")
    missing = [k for k in DOCUMENT_STATE_KEYS if k not in state]
    if missing:
        raise LabError(f"document state {state!r} lacks {missing}; expected keys {list(DOCUMENT_STATE_KEYS)}")
    moods = {"positive": 0.8, "negative": -0.8}
    if state["mood"] not in moods:
        raise LabError(f"document mood {state['mood']!r} is not a channel value; expected one of {list(moods)}")
    if state["time_of_day"] not in TIME_OF_DAY_HOURS:
        raise LabError(f"document time of day {state['time_of_day']!r} is not a channel value; expected one of "
                       f"{list(TIME_OF_DAY_HOURS)}")
    if state["posture"] not in ("cautious", "permissive"):
        raise LabError(f"document posture {state['posture']!r} is not a channel value; expected 'cautious' or 'permissive'")
    if state["weekday"] is not None and state["weekday"] not in WEEKDAYS:
        raise LabError(f"document weekday {state['weekday']!r} is not a channel value; expected one of {WEEKDAYS} or None")
    for k in ("name", "role", "topic"):
        if not isinstance(state[k], str) or not state[k].strip():
            raise LabError(f"document {k} {state[k]!r} is not a channel value; expected a non-empty string")
    return {"identity": f"I am {state['name']}, a {state['role']}.", "affect": (moods[state["mood"]], 0.0),
            "time": (TIME_OF_DAY_HOURS[state["time_of_day"]], state["weekday"]), "ethics": state["posture"],
            "continuity": f"We were just talking about {state['topic']}."}


def train_batch_items(step: int, batch_size: int, seed: int, capabilities=CAPABILITIES, rank: int = 0) -> list[Item]:
    """The training items of one step: a pure function of (seed, step, rank), capabilities in rotation."""
    rng = random.Random(hashlib.sha256(repr(("batch", seed, step, rank)).encode()).digest())
    out = []
    while len(out) < batch_size:
        cap = capabilities[rng.randrange(len(capabilities))]
        its = sample_items(cap, "train", 1, (seed, step, rank, len(out), rng.random()))
        out.append(its[rng.randrange(len(its))])
    return out


def corpus_summary(n_heldout: int = 240, seed: int = 0) -> list[dict]:
    """Per capability: templates and entities per split, and held-out counts (for reports and tests)."""
    rows = []
    for cap in CAPABILITIES:
        ho = heldout_items(cap, n_heldout, seed)
        rows.append({"capability": cap, "train_templates": len(TEMPLATES[cap]["train"]),
                     "heldout_templates": len(TEMPLATES[cap]["heldout"]), "heldout_items": len(ho),
                     "heldout_prompts": len({i.prompt for i in ho})})
    return rows


def entities(split: str) -> set[str]:
    """Every entity of a split (objects, topics, names, roles, register words and phrases)."""
    out = set()
    for name in ("objects", "topics", "day", "night", "positive", "negative", "cautious", "permissive"):
        out |= set(pool(name, split))
    for n, r in pool("personas", split):
        out |= {n, r}
    return out


FUNCTION_WORDS = {"the", "a", "with", "only", "first"}


def entity_words(split: str) -> set[str]:
    """The content words of a split's entities (function words excluded)."""
    return {w.lower() for e in entities(split) for w in e.split()} - FUNCTION_WORDS


WEEKDAY_NAMES = WEEKDAYS
TIME_SIDES = {"day": [k for k in TIMES if k in ("dawn", "morning", "noon")],
              "night": [k for k in TIMES if k in ("evening", "night")]}
