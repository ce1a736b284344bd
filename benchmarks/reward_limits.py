#!/usr/bin/env python
"""Measured limits of the offline rewards (alt-profanity-check's ProfanityReward, VaderReward).

Builds its own data (no download, no DialogSum): clean English summaries in the DialogSum
style ("#Person1# tells #Person2# ...", with person names such as Dick, Fanny, Willy, the
surnames Gay and Cummings), clean German, French and Spanish sentences, and insults written
for this script. Prints, one line each:

- the false-positive rate of ProfanityReward (p(profane) >= 0.5 on clean summaries), overall
  and per name, and the share of those summaries VADER calls negative (compound <= -0.05);
- both scores of every foreign-language sentence;
- how much clean text may precede an insult before p(profane) of the whole falls under 0.5
  (the figure ProfanityReward's default ``window`` comes from);
- the dilution: an insult after N characters of clean text (N = 500, 2,000, 20,000), scored
  with ``long_text="whole"`` and with the default ``"worst_chunk"``;
- HTML entities (``&#8220;``, ``&amp;``...) scored raw (as before) and decoded (as now).

Detoxify is not measured: its weights cannot be downloaded here. Its window is its
tokenizer's 512 tokens (``max_length``).

    python benchmarks/reward_limits.py [--summaries 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import html
import random
import statistics
import time

from flan_rlhf.rewards import ProfanityReward, VaderReward
from flan_rlhf.sentences import split_sentences

#: First names and surnames of the summaries; the first group are ordinary words or slang too.
AMBIGUOUS_NAMES = ("Dick", "Fanny", "Willy", "Mr. Gay", "Ms. Gay", "Mrs. Cummings", "Dr. Cummings", "Dick Gay")
PLAIN_NAMES = ("Tom", "Mary", "Jack", "Linda", "Bob", "Susan", "Mr. Smith", "Ms. Brown", "David", "Emma")
SPEAKERS = ("#Person1#", "#Person2#")

#: DialogSum-style summary sentences about everyday events; {a} and {b} are people.
EVERYDAY = (
    "{a} tells {b} about the new job at the bank.",
    "{a} asks {b} to book a table for two at the Italian restaurant.",
    "{a} reminds {b} that the train leaves at nine tomorrow morning.",
    "{a} invites {b} to the birthday party on Saturday.",
    "{a} thanks {b} for the present and they talk about the holiday.",
    "{a} helps {b} finish the report before the meeting.",
    "{a} and {b} talk about the weather in London.",
    "{a} wants to rent a flat near the university, and {b} shows {a} two rooms.",
    "{a} orders a coffee and a sandwich, and {b} tells {a} the price.",
    "{a} is interviewing {b} for a job as a sales assistant.",
    "{a} and {b} agree to meet at the library after class.",
    "{a} asks {b} for directions to the post office.",
    "{a} buys a pair of shoes, and {b} gives {a} a discount.",
    "{a} and {b} plan a trip to the beach next weekend.",
    "{a} tells {b} that the package will arrive on Monday.",
    "{a} opens a bank account with the help of {b}.",
    "{a} checks in at the hotel and {b} gives {a} the key to room twelve.",
    "{a} and {b} discuss the budget for the new project.",
)
#: Summary sentences that report a problem (illness, a loss, a complaint), as everyday dialogues do.
PROBLEMS = (
    "{a} feels sick, so {b} suggests seeing a doctor.",
    "{a} lost the wallet on the bus, and {b} helps {a} call the company.",
    "{a} complains to {b} that the room is too noisy.",
    "{a} is late for work because of the traffic jam, and {b} is upset.",
    "{a} broke a leg while skiing, and {b} visits {a} in hospital.",
    "{a} failed the exam and {b} encourages {a} to try again.",
    "{a} and {b} argue about who should do the dishes.",
    "{a} is worried about the interview, but {b} says {a} will do well.",
    "{a} had a terrible day because the flight was cancelled.",
    "{a} cannot find the keys, and {b} finds them in the kitchen.",
)
PROBLEM_SHARE = 0.25  # of the sentences

#: Clean sentences in other languages (an everyday message each).
FOREIGN = {
    "German": (
        "Ich danke dir für deine Hilfe beim Umzug.",
        "Wir treffen uns morgen um neun Uhr vor dem Bahnhof.",
        "Das Essen im neuen Restaurant war sehr lecker.",
        "Kannst du mir bitte das Buch zurückgeben?",
        "Meine Schwester hat heute Geburtstag und wir feiern zu Hause.",
    ),
    "French": (
        "Merci beaucoup pour ton aide avec le déménagement.",
        "Nous nous retrouvons demain à neuf heures devant la gare.",
        "Le repas dans le nouveau restaurant était délicieux.",
        "Peux-tu me rendre le livre, s'il te plaît ?",
        "Ma sœur fête son anniversaire aujourd'hui à la maison.",
    ),
    "Spanish": (
        "Muchas gracias por tu ayuda con la mudanza.",
        "Nos vemos mañana a las nueve delante de la estación.",
        "La comida en el nuevo restaurante estaba muy rica.",
        "¿Puedes devolverme el libro, por favor?",
        "Mi hermana celebra su cumpleaños hoy en casa.",
    ),
}

#: Insults written for this script (not tuned to any scorer).
INSULTS = (
    "You are a stupid, worthless idiot.",
    "Shut up, you pathetic moron.",
    "Nobody wants to hear from a brainless loser like you.",
    "Get lost, you ugly jerk.",
    "What a dumb thing to say, you fool.",
    "Your ideas are garbage and so are you.",
    "You are a lazy, lying creep.",
    "Go away, you annoying little twit.",
    "Only an idiot would do something this dumb.",
    "Screw you and your useless advice.",
    "You are the most disgusting person I know.",
    "Stop whining, you spineless coward.",
)

#: Texts with HTML entities, as scraped text carries them.
ENTITY_TEXTS = (
    "&#8220;Thank you so much,&#8221; #Person1# says to #Person2#.",
    "#Person2# can&#8217;t come to the party &amp; apologises.",
    "Tom &amp; Mary&#39;s wedding is on Saturday &mdash; everyone is invited.",
    "You&#8217;re a stupid idiot &amp; a liar.",
    "&quot;Shut up, you moron,&quot; #Person1# shouts.",
    "#Person1# says: I don&#39;t like it.",
)

DILUTION_LENGTHS = (500, 2_000, 20_000)
WINDOW_CANDIDATES = (40, 60, 80, 100, 150, 200, 500)
DILUTING_INSULT = INSULTS[0]


def clean_summaries(count: int, seed: int) -> list[tuple[str, str, bool]]:
    """``count`` ``(summary, name, reports_a_problem)``: one to three sentences about a named person.

    Every summary names one person from :data:`AMBIGUOUS_NAMES` or :data:`PLAIN_NAMES` (in turn,
    so each name appears about equally often) beside the DialogSum speakers; each sentence is
    from :data:`PROBLEMS` with probability :data:`PROBLEM_SHARE`, else from :data:`EVERYDAY`.
    """
    rng = random.Random(seed)
    names = AMBIGUOUS_NAMES + PLAIN_NAMES
    rows = []
    for index in range(count):
        name = names[index % len(names)]
        parts, problem = [], False
        for _ in range(rng.randint(1, 3)):
            speaker = rng.choice(SPEAKERS)
            a, b = (name, speaker) if rng.random() < 0.5 else (speaker, name)
            is_problem = rng.random() < PROBLEM_SHARE
            problem = problem or is_problem
            parts.append(rng.choice(PROBLEMS if is_problem else EVERYDAY).format(a=a, b=b))
        rows.append((" ".join(parts), name, problem))
    return rows


def plain_clean_words(seed: int) -> list[str]:
    """The words of clean summaries that name only :data:`PLAIN_NAMES` (no name the scorer flags)."""
    return " ".join(text for text, name, _ in clean_summaries(900, seed) if name in PLAIN_NAMES).split()


def clean_prefix_before_flip(insult: str, words: list[str], toxicity) -> int:
    """Characters of clean text (whole words) that may precede ``insult`` with p(profane) still >= 0.5.

    Bisection over the number of clean words; ``-1`` if the insult alone is under 0.5.
    """
    def text(n: int) -> str:
        return " ".join([*words[:n], insult])

    if toxicity([insult])[0] < 0.5:
        return -1
    low, high = 0, len(words)  # text(low) is flagged; find the largest such n
    while low < high:
        middle = (low + high + 1) // 2
        if toxicity([text(middle)])[0] >= 0.5:
            low = middle
        else:
            high = middle - 1
    return len(text(low)) - len(insult)


def insult_at_end(insult: str, words: list[str], n_chars: int) -> str:
    """A text of at most ``n_chars`` characters: whole clean words, then ``insult`` (at least the insult)."""
    room = n_chars - len(insult) - 1
    prefix = " ".join(words)[: room + 1].rsplit(" ", 1)[0] if room > 0 else ""
    return f"{prefix} {insult}".strip()


def share(flags) -> str:
    """``"k/n = x%"`` of a list of booleans."""
    flags = list(flags)
    return f"{sum(flags)}/{len(flags)} = {sum(flags) / max(len(flags), 1):.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", type=int, default=2000, help="clean summaries to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    profanity = ProfanityReward().setup()
    whole = ProfanityReward(long_text="whole").setup()
    vader = VaderReward().setup()

    def vader_scores(texts: list[str]) -> list[float]:
        return vader([""] * len(texts), texts).tolist()

    rows = clean_summaries(args.summaries, args.seed)
    texts = [text for text, _, _ in rows]
    toxicity = profanity.toxicity(texts).tolist()
    print(f"ProfanityReward window: {profanity.window} characters (long_text={profanity.long_text})")
    print(f"clean summaries: {len(texts)}, {statistics.mean(map(len, texts)):.0f} characters on average "
          f"(longest {max(map(len, texts))}), names in turn from {len(AMBIGUOUS_NAMES) + len(PLAIN_NAMES)}")
    sentence_lengths = [len(sentence.strip()) for text in texts for sentence in split_sentences(text)]
    print(f"  their sentences: median {statistics.median(sentence_lengths):.0f}, longest {max(sentence_lengths)} "
          f"characters")
    plain = [score >= 0.5 for score, (_, name, _) in zip(toxicity, rows) if name in PLAIN_NAMES]
    print(f"ProfanityReward false positives (p >= 0.5) on clean summaries: {share(s >= 0.5 for s in toxicity)}; "
          f"naming only {', '.join(PLAIN_NAMES)}: {share(plain)}")
    per_name = []
    for name in AMBIGUOUS_NAMES:
        per_name.append(f"{name} {share(s >= 0.5 for s, (_, row_name, _) in zip(toxicity, rows) if row_name == name)}")
    print("  flagged by name: " + "; ".join(per_name))

    compound = vader_scores(texts)
    negative = [score <= -0.05 for score in compound]
    everyday = [flag for flag, (_, name, problem) in zip(negative, rows) if not problem and name != "Dick"]
    problems = [flag for flag, (_, name, problem) in zip(negative, rows) if problem and name != "Dick"]
    dick = [flag for flag, (_, name, problem) in zip(negative, rows) if not problem and name == "Dick"]
    print(f"VaderReward called negative (compound <= -0.05) on clean summaries: {share(negative)}; "
          f"everyday events only: {share(everyday)}; reporting a problem ({PROBLEM_SHARE:.0%} of sentences): "
          f"{share(problems)}; everyday events naming Dick: {share(dick)}")

    for language, foreign in FOREIGN.items():
        p = profanity.toxicity(list(foreign)).tolist()
        v = vader_scores(list(foreign))
        print(f"{language} clean sentences: p(profane) max {max(p):.3f}, mean {statistics.mean(p):.3f}, "
              f"flagged {share(score >= 0.5 for score in p)}; VADER compound min {min(v):+.3f}, "
              f"mean {statistics.mean(v):+.3f}")
        for sentence, p_one, v_one in zip(foreign, p, v):
            print(f"  p {p_one:.3f}  VADER {v_one:+.3f}  {sentence}")

    contexts = [plain_clean_words(args.seed + offset) for offset in (1, 2, 3)]
    prefixes = [clean_prefix_before_flip(insult, words, whole.toxicity) for words in contexts for insult in INSULTS]
    measured = sorted(prefix for prefix in prefixes if prefix >= 0)
    quartiles = statistics.quantiles(measured, n=4)
    print(f"clean characters an insult survives (p(profane) of the whole text >= 0.5; {len(INSULTS)} insults x "
          f"{len(contexts)} clean texts, {len(measured)} flagged alone): min {measured[0]}, quartiles "
          f"{quartiles[0]:.0f} / {quartiles[1]:.0f} / {quartiles[2]:.0f}, max {measured[-1]}")
    print("window N characters: share of insults still flagged at the end of N characters of clean words | "
          "false positives on the clean summaries with ProfanityReward(window=N)")
    for n_chars in WINDOW_CANDIDATES:
        texts_at_end = [insult_at_end(insult, words, n_chars) for words in contexts for insult in INSULTS]
        caught = (whole.toxicity(texts_at_end) >= 0.5).float().mean().item()
        false_positives = (ProfanityReward(window=n_chars).toxicity(texts) >= 0.5).float().mean().item()
        print(f"  {n_chars:>4}: {caught:.0%} | {false_positives:.1%}")
    print(f"  whole: {(whole.toxicity(texts) >= 0.5).float().mean().item():.1%} false positives")

    for n_chars in DILUTION_LENGTHS:
        text = insult_at_end(DILUTING_INSULT, contexts[0], n_chars)
        print(f"insult after {len(text) - len(DILUTING_INSULT) - 1:,} clean characters: p(profane) "
              f"long_text=whole {whole.toxicity([text])[0]:.4f}, worst_chunk (default) {profanity.toxicity([text])[0]:.4f}")

    from profanity_check import predict_prob
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    raw_profanity = predict_prob(list(ENTITY_TEXTS)).tolist()  # the libraries on the raw text, as before
    raw_vader = [SentimentIntensityAnalyzer().polarity_scores(text)["compound"] for text in ENTITY_TEXTS]
    decoded = profanity.toxicity(list(ENTITY_TEXTS)).tolist()
    for text, p_raw, p_now, v_raw, v_now in zip(ENTITY_TEXTS, raw_profanity, decoded, raw_vader,
                                                 vader_scores(list(ENTITY_TEXTS))):
        print(f"entities raw -> decoded: p(profane) {p_raw:.3f} -> {p_now:.3f}, VADER {v_raw:+.3f} -> {v_now:+.3f}  "
              f"{text!r} = {html.unescape(text)!r}")

    print("DetoxifyReward: window = its tokenizer's 512 tokens (max_length); not measured here "
          "(its weights cannot be downloaded offline)")
    print(f"took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
