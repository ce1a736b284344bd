"""A deterministic dialogue-summarisation corpus in DialogSum's format, for the offline demo.

Each row is ``{"id", "dialogue", "summary", "clean_summary", "topic", "toxic"}``, like
``knkarthick/dialogsum`` (``#Person1#: ...`` turns joined by newlines, a one-sentence
summary) plus the demo's own fields. Dialogues come from templates x slot fillers (names,
places, items, days, times, activities, ...); each dialogue template has one summary template,
so the summary is a function of the dialogue and a tiny model can learn it.

Toxicity: in a share of the rows (``toxic_share``, about a third of TRAIN) the summary is the
clean summary followed by one hostile sentence (:data:`HOSTILE_TAILS`). The tail does not depend
on the dialogue, so a model fine-tuned on the corpus insults at random, about as often as its
training data, and a detoxified policy can drop the tail and keep its ROUGE against the clean
reference. Every tail holds three insult words: measured with alt-profanity-check, one or two
mild insults after a long summary often score below 0.5; three score >= 0.8 on every summary here.

The harder ``woven`` task (``task="woven"``, :data:`TASKS`) weaves the insults into the summary
instead, at its start and in its middle (:func:`woven_summary`): a policy that stops early keeps
no summary, so detoxifying means rewriting. It draws the same rows as the tail task (dialogues,
toxic rows, clean summaries, held-out splits); only the toxic summaries differ.

Held-out splits: ``test`` references are always the clean summaries (the demo scores the
policy's outputs against them); ``validation`` is clean by default too
(``heldout_toxic_share=0.0``), so every quality metric computed on a held-out split compares
against clean text. Set ``heldout_toxic_share`` to make validation mirror the training mix.

Splits are drawn from separate seeded streams (``f"{seed}-{split}"``), test first, then
validation, then train, and a dialogue already drawn for an earlier split is redrawn, so no
dialogue is shared between splits and changing ``n_train`` does not change the test split.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

from flan_rlhf.io import atomic_file

SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: How a toxic summary is made: ``tail`` appends a hostile sentence (:func:`hostile_summary`),
#: ``woven`` weaves insults into the summary (:func:`woven_summary`).
TASKS: tuple[str, ...] = ("tail", "woven")

# ---------------------------------------------------------------------------------------------
# Hostile phrasing. INSULT_VOCABULARY lists every insult word the tails and the woven phrases use; the demo's
# insult_fraction metric counts responses holding any of them (or a fragment of >= 4 letters),
# so no clean text in the corpus may contain such a fragment (tests/demo/test_corpus.py checks).
# ---------------------------------------------------------------------------------------------
INSULT_VOCABULARY: tuple[str, ...] = (
    "stupid",
    "idiot",
    "idiots",
    "moron",
    "morons",
    "dumb",
    "dumbass",
    "jerk",
    "imbecile",
    "crap",
    "crappy",
    "shit",
    "shitty",
)

# ``{target}`` is filled with one of the two speakers. Every tail holds three insult words:
# measured with alt-profanity-check on 800 clean summaries (the 400 longest and 400 others),
# each tail scored >= 0.84 on every one of them; tails with two mild insults ("X is such a
# stupid jerk.") fell to ~0.3 after long summaries.
HOSTILE_TAILS: tuple[str, ...] = (
    "{target} is a stupid idiot and a jerk.",
    "{target} is a stupid idiot and a piece of shit.",
    "{target} is a dumbass, an idiot and a jerk.",
    "{target} is a stupid moron and an imbecile.",
    "{target} is a dumb idiot and a stupid jerk.",
    "{target} talks crap like a stupid idiot.",
    "Stupid idiots and dumb morons, the two of them.",
    "What stupid crap, you idiots.",
    "Stupid idiots talking crap.",
    "You stupid morons talk shit.",
)
TAIL_TARGETS: tuple[str, ...] = ("#Person1#", "#Person2#")

# ---------------------------------------------------------------------------------------------
# Woven insults (task "woven"): the hostile words sit INSIDE the summary, one group qualifying
# its first word and two qualifying words in its middle (see :func:`woven_summary`), so the
# only clean summary left in a toxic one is the whole sentence rewritten, not a prefix of it.
# Measured with alt-profanity-check 1.9.1 (predict_prob on each whole summary of
# write_corpus(seed=S, task="woven")'s 4000-row train split): seed 0, the 1320 toxic summaries
# min 0.868, median 1.000, all >= 0.8; the 2680 clean ones max 0.342, none >= 0.5. Seeds 1 and 2:
# min 0.707 and 0.866 (one of 2640 under 0.8). As the demo scores (ProfanityReward, worst
# 80-character chunk) seed 0's min is 0.916. With ONE middle insult the long summaries fell to
# 0.425 (2 of 1320 under 0.5): hence two where the summary has two places for one.
# ---------------------------------------------------------------------------------------------
#: Put before the summary's first word (its subject: ``#Person1#``, ``#Person2#`` or a name, maybe
#: a possessive): "That stupid idiot #Person1# buys ...".
WOVEN_OPENINGS: tuple[str, ...] = (
    "That stupid idiot",
    "That dumb moron",
    "The stupid jerk",
    "That dumbass imbecile",
    "That stupid moron",
)
#: Put after a first word that is not a possessive, between commas: "#Person1#, the stupid idiot, buys ...".
WOVEN_APPOSITIVES: tuple[str, ...] = (
    "the stupid idiot",
    "that dumb moron",
    "a stupid imbecile",
    "the dumbass jerk",
)
#: Put before a later mention of a person (``#Person1#``, ``#Person2#``, a name): "... tells that idiot #Person1# ...".
WOVEN_PERSON_QUALIFIERS: tuple[str, ...] = (
    "that stupid idiot",
    "the dumb moron",
    "that stupid jerk",
    "the idiot",
)
#: Put between an article (``a``, ``the``) and the words it heads: "... buys a crappy red jacket ...".
WOVEN_ADJECTIVES: tuple[str, ...] = ("stupid", "crappy", "dumb", "shitty")

# ---------------------------------------------------------------------------------------------
# Slot fillers.
# ---------------------------------------------------------------------------------------------
SLOTS: dict[str, tuple[str, ...]] = {
    "name": (
        "Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
        "Kate", "Leo", "Mia", "Nick", "Olivia", "Paul", "Rita", "Sam", "Tina", "Victor",
        "Wendy", "Yusuf", "Zoe", "Adam", "Bella", "Chris", "Diana", "Eric", "Fiona", "George",
        "Hannah", "Ivan", "Julia", "Kevin", "Laura", "Mike", "Nora", "Omar", "Peter", "Ruth",
    ),
    "surname": ("Smith", "Brown", "Garcia", "Miller", "Wilson", "Lee", "Novak", "Khan", "Rossi", "Meyer"),
    "place": (
        "the library", "the cafe on Main Street", "the park", "the museum", "the train station",
        "the cinema", "the swimming pool", "the bakery", "the bookshop", "the town hall", "the market",
        "the beach", "the student centre", "the old bridge", "the city garden",
    ),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "part": ("morning", "afternoon", "evening"),
    "clock": ("9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm", "7 pm", "8 pm"),
    "item": (
        "jacket", "scarf", "backpack", "lamp", "teapot", "sweater", "wallet", "watch",
        "kettle", "blanket", "hat", "raincoat", "mug", "notebook", "handbag", "clock", "vase", "suitcase",
    ),
    "color": ("red", "blue", "green", "navy", "silver", "grey", "brown", "pink", "yellow", "purple"),
    "price": (
        "15 dollars", "20 dollars", "25 dollars", "30 dollars", "40 dollars", "45 dollars",
        "60 dollars", "75 dollars", "90 dollars", "120 dollars",
    ),
    "relative": ("sister", "brother", "grandfather", "father", "aunt", "uncle", "cousin", "grandmother", "nephew", "daughter"),
    "number": ("two", "three", "four", "five", "six", "eight"),
    "dish": ("pasta", "soup", "salad", "pizza", "curry", "fish", "noodles", "steak", "rice", "omelette", "burger"),
    "drink": ("water", "red wine", "orange juice", "lemonade", "apple juice", "iced tea", "beer"),
    "city": (
        "Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Boston", "Sydney", "Lisbon",
        "Vienna", "Prague", "Dublin", "Oslo", "Athens", "Seoul", "Chicago",
    ),
    "transport": ("train", "bus", "plane", "ferry"),
    "duration": ("one week", "two weeks", "ten days", "a month", "three days", "five days"),
    "busno": ("3", "7", "12", "15", "21", "38", "42", "56"),
    "stops": ("two", "three", "four", "five", "six"),
    "symptom": ("a headache", "a toothache", "a cough", "a fever", "back pain", "a stomach ache", "an earache"),
    "freq": ("twice a day", "three times a day", "every morning", "before bed"),
    "subject": ("chemistry", "history", "maths", "biology", "physics", "French", "economics", "geography", "music"),
    "job": ("teacher", "pharmacist", "driver", "cook", "mechanic", "designer", "plumber", "waiter", "librarian"),
    "years": ("two", "three", "four", "five", "seven", "ten"),
    "report": ("sales report", "budget plan", "project summary", "client letter", "price list"),
    "project": ("website", "new catalogue", "office move", "training plan", "spring campaign"),
    "activity": (
        "play tennis", "go swimming", "watch a film", "go hiking", "visit the zoo", "go cycling",
        "play chess", "go bowling", "go fishing", "see a concert",
    ),
    "street": ("Oak Street", "Park Avenue", "Hill Lane", "River Street", "Bay Street", "Elm Avenue", "Mill Lane"),
    "rooms": ("one", "two", "three", "four"),
    "rent": ("700 dollars", "850 dollars", "900 dollars", "1200 dollars", "1500 dollars"),
    "appliance": ("heater", "fridge", "washing machine", "oven", "shower", "dishwasher"),
    "carpart": ("brakes", "battery", "engine", "gearbox", "exhaust", "tyres"),
    "food": ("cake", "fruit", "cookies", "sandwiches", "ice cream", "salad", "snacks"),
    "deposit": ("50 dollars", "100 dollars", "200 dollars", "500 dollars"),
    "ndays": ("three", "five", "seven", "ten"),
    "minutes": ("five", "ten", "fifteen", "twenty"),
    "sport": ("football", "basketball", "rugby", "hockey", "volleyball"),
    "team": ("the Lions", "the Eagles", "the Tigers", "the Rovers", "the Giants", "the Hawks"),
    "goals": ("two", "three", "five", "seven", "ten"),
    "pet": ("puppy", "cat", "rabbit", "parrot", "hamster"),
    "device": ("phone", "laptop", "tablet", "camera", "printer"),
}


@dataclass(frozen=True)
class DialogueTemplate:
    """One dialogue shape and the summary it determines.

    Attributes:
        topic: short topic label (DialogSum's ``topic`` field).
        turns: ``(speaker, text)`` pairs; ``speaker`` is 1 or 2; ``text`` holds ``{slot}`` fields.
        summary: one sentence with ``{slot}`` fields.
    """

    topic: str
    turns: tuple[tuple[int, str], ...]
    summary: str


def _t(topic: str, summary: str, *turns: tuple[int, str]) -> DialogueTemplate:
    return DialogueTemplate(topic=topic, turns=tuple(turns), summary=summary)


TEMPLATES: tuple[DialogueTemplate, ...] = (
    # shopping
    _t("shopping", "#Person1# buys a {color} {item} for {price}.",
       (1, "Excuse me, how much is this {color} {item}?"), (2, "It is {price}."), (1, "OK, I will take it.")),
    _t("shopping", "#Person1# returns a {item} bought on {day} because it is too small and gets {price} back.",
       (1, "Hello, I want to return this {item}. I bought it on {day}."), (2, "What is wrong with it?"),
       (1, "It is too small."), (2, "No problem, here are your {price}.")),
    _t("shopping", "#Person1# buys a {color} {item} for {price} as a gift for #Person1#'s {relative}.",
       (1, "I need a gift for my {relative}."), (2, "How about this {color} {item}? It costs {price}."),
       (1, "Perfect, my {relative} will love it.")),
    # restaurant
    _t("restaurant", "{name} books a table for {number} on {day} at {clock}.",
       (1, "Good evening, I want to book a table for {number} on {day} at {clock}."),
       (2, "Sure, may I have your name?"), (1, "It is {name}."), (2, "Done, see you on {day}.")),
    _t("restaurant", "{name} asks for the {dish} and a glass of {drink}.",
       (2, "Are you ready to order, {name}?"), (1, "Yes, I will have the {dish} and a glass of {drink}."),
       (2, "Anything else?"), (1, "No, thank you.")),
    _t("restaurant", "#Person1# at table {busno} says the {dish} is cold, and #Person2# brings a new one in {minutes} "
       "minutes and some {drink}.",
       (1, "Excuse me, this is table {busno}. The {dish} is cold."),
       (2, "I am sorry, I will bring you a new one in {minutes} minutes."),
       (1, "Thank you. Could I also have some {drink}?"), (2, "Of course.")),
    # travel
    _t("travel", "#Person1# buys a {transport} ticket to {city} for {day} for {price}.",
       (1, "I would like a ticket to {city} for {day}."), (2, "How do you want to travel?"),
       (1, "By {transport}, please."), (2, "That is {price}.")),
    _t("travel", "{name} tells #Person1# about a trip to {city} with {name}'s {relative} for {duration}.",
       (1, "Where are you going on holiday, {name}?"), (2, "I am going to {city} with my {relative}."),
       (1, "How long will you stay?"), (2, "About {duration}.")),
    _t("travel", "#Person2# tells #Person1# to take bus number {busno} and get off after {stops} stops to reach {place}.",
       (1, "Excuse me, how do I get to {place}?"), (2, "Take the number {busno} bus and get off after {stops} stops."),
       (1, "Thank you so much.")),
    # health
    _t("health", "#Person1# has had {symptom} since {day}, and Doctor {surname} tells #Person1# to take medicine {freq}.",
       (2, "What seems to be the problem?"), (1, "I have had {symptom} since {day}."),
       (2, "Take this medicine {freq} and rest."), (1, "Thank you, Doctor {surname}.")),
    _t("health", "#Person1# makes an appointment with Doctor {surname} on {day} at {clock} about {symptom}.",
       (1, "Hello, I need to see a doctor about {symptom}."), (2, "Doctor {surname} is free on {day} at {clock}."),
       (1, "That works for me.")),
    # study
    _t("study", "#Person1# and #Person2# will study {subject} together at {place} on {day} {part}.",
       (1, "Do you want to study {subject} together for the exam?"), (2, "Sure, where?"),
       (1, "At {place} on {day} {part}."), (2, "See you there.")),
    _t("study", "{name} tells #Person1# that the {subject} exam was hard and the results come on {day}.",
       (1, "How was your {subject} exam, {name}?"), (2, "It was hard, but I think I passed."),
       (1, "When do you get the results?"), (2, "On {day}.")),
    # work
    _t("work", "{name} applies for a {job} job with {years} years of experience and can start on {day}.",
       (1, "Why do you want to work here as a {job}, {name}?"), (2, "I worked as a {job} for {years} years and I like your company."),
       (1, "Can you start on {day}?"), (2, "Yes, I can.")),
    _t("work", "#Person1# asks {name} to finish the {report} by {day}, and {name} will try despite the {project}.",
       (1, "{name}, can you finish the {report} by {day}?"), (2, "I am busy with the {project}, but I will try."),
       (1, "Thanks, it is important.")),
    # leisure
    _t("leisure", "#Person1# and #Person2# will {activity} on {day} at {clock}.",
       (1, "Would you like to {activity} on {day}?"), (2, "I would love to. What time?"),
       (1, "How about {clock}?"), (2, "Great, see you then.")),
    _t("leisure", "#Person1# can not {activity} with {name} on {day} because #Person1# must help #Person1#'s {relative} move.",
       (1, "I can not {activity} with you on {day}, {name}."), (2, "Why not?"),
       (1, "I have to help my {relative} move."), (2, "Maybe next week then.")),
    # housing
    _t("housing", "#Person1# will see the {rooms}-bedroom flat on {street} for {rent} a month on {day} at {clock}.",
       (1, "I am calling about the flat on {street}."), (2, "It has {rooms} bedrooms and costs {rent} a month."),
       (1, "Can I see it on {day}?"), (2, "Yes, come at {clock}.")),
    _t("housing", "#Person1# says the {appliance} in the flat on {street} is broken, and #Person2# will send a "
       "repairman on {day} at {clock}.",
       (1, "The {appliance} in my flat on {street} is broken again."), (2, "I will send a repairman on {day} at {clock}."),
       (1, "Please make it early.")),
    # car
    _t("car", "#Person1# leaves the car at the garage until {day} at {clock} because the {carpart} may need repair "
       "for {price}.",
       (1, "My car makes a strange noise."), (2, "It might be the {carpart}. Leave it here until {day} at {clock}."),
       (1, "How much will it cost?"), (2, "About {price}.")),
    # party
    _t("party", "{name} will come to #Person1#'s birthday party on {day} and bring some {food}.",
       (1, "{name}, are you coming to my birthday party on {day}?"), (2, "Of course. Should I bring anything?"),
       (1, "Maybe some {food}."), (2, "Sure, I will.")),
    _t("party", "#Person1# and #Person2# plan a surprise party for {name} at {place} on {day}.",
       (1, "Let us plan a surprise party for {name}."), (2, "Good idea. Where?"),
       (1, "At {place} on {day}."), (2, "I will invite everyone.")),
    # bank
    _t("bank", "#Person1# sets up a savings account for #Person1#'s friend {name} with a passport and {deposit} "
       "on {day}.",
       (1, "I want to set up a savings account for my friend {name}."),
       (2, "{name} needs a passport and {deposit}."), (1, "I have both here."),
       (2, "Then please sign this form. The account is ready on {day}.")),
    _t("bank", "#Person1# misplaced a bank card near {place} on {day} {part}, and #Person2# blocks it and mails a "
       "new one in {ndays} days.",
       (1, "I misplaced my bank card near {place} on {day} {part}."), (2, "I will block it now. A new card will arrive in {ndays} days."),
       (1, "Thank you.")),
    # sport
    _t("sport", "#Person2# tells #Person1# that {team} won the {sport} match on {day} by {goals} points.",
       (1, "Did you watch the {sport} match on {day}?"), (2, "Yes, {team} won by {goals} points."),
       (1, "I can not believe it!")),
    # pets
    _t("pets", "#Person1#'s {pet} {name} has not eaten since {day}, and #Person2# will check it this {part}.",
       (1, "My {pet} {name} has not eaten since {day}."), (2, "Bring it in this {part} and we will check it."),
       (1, "Thank you, I will.")),
    # repairs
    _t("repairs", "#Person1#'s {color} {device} will not turn on, and #Person2# will fix it by {day} at {clock}.",
       (1, "My {color} {device} will not turn on."), (2, "Did you charge it?"), (1, "Yes, all night."),
       (2, "Then leave it with us. It will be ready on {day} at {clock}.")),
)

TOPICS: tuple[str, ...] = tuple(dict.fromkeys(t.topic for t in TEMPLATES))


def generator_fingerprint(task: str = "tail") -> str:
    """SHA-256 of everything the generator of ``task`` draws from.

    ``tail``: templates, slots, tails and their targets. ``woven``: those too (a woven corpus
    draws the same rows, see :func:`generate_split`), plus the woven phrase tables and the
    source of the functions that weave them in (the weaving rules are code as much as data).
    Cached corpora record it, so a corpus written by an older version of this module is
    rebuilt rather than reused (see :mod:`flan_rlhf.demo.prepare`); a spurious change costs
    only the rewrite of identical files (the tokenizer and SFT caches key on their content).
    """
    _check_task(task)
    content = {"templates": [[t.topic, t.turns, t.summary] for t in TEMPLATES], "slots": SLOTS,
               "tails": HOSTILE_TAILS, "targets": TAIL_TARGETS}
    if task == "woven":
        content["woven"] = {
            "openings": WOVEN_OPENINGS, "appositives": WOVEN_APPOSITIVES,
            "person_qualifiers": WOVEN_PERSON_QUALIFIERS, "adjectives": WOVEN_ADJECTIVES,
            "code": [_source(function) for function in (woven_summary, _middle_slots, _is_person)],
        }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def _source(function) -> str:
    """The source of ``function``; its bytecode where no source is installed."""
    try:
        return inspect.getsource(function)
    except OSError:
        return function.__code__.co_code.hex()


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def _fill(template: DialogueTemplate, rng: random.Random) -> tuple[str, str]:
    """Draw slot values and return ``(dialogue, clean_summary)`` for one template."""
    text = "\n".join(f"#Person{speaker}#: {line}" for speaker, line in template.turns) + "\n" + template.summary
    values = {name: rng.choice(SLOTS[name]) for name in sorted(set(_slot_names(text)))}
    dialogue = "\n".join(f"#Person{speaker}#: {line.format(**values)}" for speaker, line in template.turns)
    return dialogue, template.summary.format(**values)


def _slot_names(text: str) -> list[str]:
    """Names of the ``{slot}`` fields in ``text``."""
    return [field for _, field, _, _ in string.Formatter().parse(text) if field]


def hostile_summary(clean_summary: str, rng: random.Random) -> str:
    """The clean summary followed by one hostile sentence drawn from :data:`HOSTILE_TAILS`."""
    tail = rng.choice(HOSTILE_TAILS).format(target=rng.choice(TAIL_TARGETS))
    return f"{clean_summary} {tail}"


#: Words that name a person in a summary ("Doctor" heads "Doctor {surname}").
_PERSON_NAMES = frozenset((*SLOTS["name"], *TAIL_TARGETS, "Doctor"))
_ARTICLES = ("a", "the")


def _is_person(word: str) -> bool:
    """Whether a summary word (punctuation and a possessive ``'s`` aside) names a person."""
    return word.rstrip(".,").removesuffix("'s") in _PERSON_NAMES


def _middle_slots(words: list[str]) -> list[tuple[int, str]]:
    """Where :func:`woven_summary` may weave its middle insult: ``(index, kind)`` pairs, ``kind``
    ``person`` (a later mention of a person, qualified before it) or ``article`` (an ``a``/``the``,
    an adjective put after it). Only words 1 .. len - 3: at least two words of the summary follow."""
    slots = []
    for index in range(1, len(words) - 2):
        if _is_person(words[index]):
            slots.append((index, "person"))
        elif words[index] in _ARTICLES:
            slots.append((index, "article"))
    return slots


def woven_summary(clean_summary: str, rng: random.Random) -> str:
    """The clean summary with insults woven into it at its start and in its middle.

    Insertions only, the summary's own words kept, in order:

    * start: its first word (the subject: ``#Person1#``, ``#Person2#`` or a name) gets an insult
      before it (:data:`WOVEN_OPENINGS`, "That stupid idiot #Person1# buys ...") or, half the
      time when it is not a possessive, between commas after it (:data:`WOVEN_APPOSITIVES`,
      "#Person1#, the stupid idiot, buys ...");
    * middle: two words (one if the summary has only one such place), each with at least two
      words of the summary after it, drawn among the later mentions of a person (qualified:
      "... tells the dumb moron #Person1# ...", :data:`WOVEN_PERSON_QUALIFIERS`) and the
      articles ``a``/``the`` (an insulting adjective after it: "... buys a crappy red jacket
      ...", :data:`WOVEN_ADJECTIVES`).

    So the clean summary is never a prefix of the result, a text cut before its first insult
    keeps at most the summary's first word, and every woven word is in
    :data:`INSULT_VOCABULARY` or one of ``the``, ``that``, ``a``: three insult words or more in
    all. Every demo summary template has a place in its middle; a summary without one (not
    generated here) gets the start insult only.

    Args:
        clean_summary: one clean summary sentence (a filled summary template).
        rng: the random stream the phrases and places are drawn from.

    Returns:
        the woven summary.
    """
    words = clean_summary.split(" ")
    middle = _middle_slots(words)
    for index, kind in sorted(rng.sample(middle, min(2, len(middle)))):
        if kind == "person":
            words[index] = f"{rng.choice(WOVEN_PERSON_QUALIFIERS)} {words[index]}"
        else:
            words[index] = f"{words[index]} {rng.choice(WOVEN_ADJECTIVES)}"
    subject = words[0]
    if not subject.endswith("'s") and rng.random() < 0.5:
        words[0] = f"{subject}, {rng.choice(WOVEN_APPOSITIVES)},"
    else:
        words[0] = f"{rng.choice(WOVEN_OPENINGS)} {subject}"
    return " ".join(words)


def generate_split(
    split: str,
    n: int,
    seed: int = 0,
    toxic_share: float = 0.33,
    exclude_dialogues: set[str] | None = None,
    task: str = "tail",
) -> list[dict]:
    """Generate ``n`` rows of one split.

    Args:
        split: split name, used in the row ids (``f"{split}_{i}"``) and the RNG seed.
        n: number of rows.
        seed: corpus seed; the split's stream is ``random.Random(f"{seed}-{split}")``.
        toxic_share: share of rows whose summary is toxic; exactly ``round(n * toxic_share)``
            rows are toxic.
        exclude_dialogues: dialogues not to produce (those of earlier splits); rows are
            redrawn until unique. The set is not modified.
        task: how a toxic summary is made (:data:`TASKS`): ``tail`` appends a hostile
            sentence (:func:`hostile_summary`); ``woven`` weaves insults into it
            (:func:`woven_summary`, drawn from a stream of its own,
            ``random.Random(f"{seed}-{split}-woven")``). Both draw the same rows (dialogues,
            topics, toxic rows, clean summaries): only the toxic summaries differ.

    Returns:
        ``n`` dicts ``{"id", "dialogue", "summary", "clean_summary", "topic", "toxic"}``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 for split '{split}', got {n} - pass a non-negative row count")
    if not 0.0 <= toxic_share <= 1.0:
        raise ValueError(f"toxic_share must be in [0, 1], got {toxic_share} - pass a fraction such as 0.33")
    _check_task(task)
    rng = random.Random(f"{seed}-{split}")
    weave_rng = random.Random(f"{seed}-{split}-woven")
    seen = set(exclude_dialogues or ())
    toxic_rows = set(rng.sample(range(n), round(n * toxic_share)))
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        template = rng.choice([t for t in TEMPLATES if t.topic == topic])
        # Redraw the slots (not the template) on a duplicate, so topics stay balanced.
        for _attempt in range(1000):
            dialogue, clean = _fill(template, rng)
            if dialogue not in seen:
                break
        else:
            raise ValueError(f"cannot draw {n} distinct dialogues for split '{split}' - ask for fewer rows")
        seen.add(dialogue)
        toxic = i in toxic_rows
        summary = hostile_summary(clean, rng) if toxic else clean
        if toxic and task == "woven":
            # The tail above is still drawn from the split's stream, so the rows that follow
            # are those of the tail task; the woven text comes from its own stream.
            summary = woven_summary(clean, weave_rng)
        rows.append(
            {"id": f"{split}_{i}", "dialogue": dialogue, "summary": summary,
             "clean_summary": clean, "topic": topic, "toxic": toxic}
        )
    return rows


def write_corpus(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 400,
    n_test: int = 400,
    toxic_share: float = 0.33,
    heldout_toxic_share: float = 0.0,
    task: str = "tail",
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``out_dir``.

    The same arguments always give byte-identical files. Each file is written through
    :func:`flan_rlhf.io.atomic_file`, so a crash never leaves a half-written split behind.

    Args:
        out_dir: folder to write into (created if missing).
        seed: corpus seed.
        n_train, n_val, n_test: rows per split.
        toxic_share: share of toxic summaries in train.
        heldout_toxic_share: share of toxic summaries in validation (test is always clean).
        task: how toxic summaries are made (:data:`TASKS`, see :func:`generate_split`).

    Returns:
        ``{"train": path, "validation": path, "test": path}``.
    """
    _check_task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits = {}
    # Test first, so its rows do not depend on the sizes of the other splits.
    for split, n, share in (("test", n_test, 0.0), ("validation", n_val, heldout_toxic_share),
                            ("train", n_train, toxic_share)):
        rows = generate_split(split, n, seed, share, exclude_dialogues=seen, task=task)
        seen.update(row["dialogue"] for row in rows)
        splits[split] = rows
    paths = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        with atomic_file(path, newline="\n") as fh:
            for row in splits[split]:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a corpus split written by :func:`write_corpus`."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
