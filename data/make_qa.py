"""Generate data/qa.jsonl: short reading-comprehension questions with short, checkable answers.

Every question carries what is needed to answer it (one or two short sentences, then the question), with
distractors of the same kind in the same sentence. Answers are 1-4 words: a name, a number written as digits,
a place, a colour, a time, a job or an object. Extractive answers are copied from the question without a
leading article ("kitchen", not "the kitchen").

Standard library only and deterministic: every run gives the same bytes (checked with Python 3.9 to 3.13).

    python data/make_qa.py > data/qa.jsonl
    python data/make_qa.py --out data/qa.jsonl
    python data/make_qa.py --chat --out data/qa_chat.jsonl   # the same pairs as conversations (data=chat)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20250611
MAX_QUESTION_CHARS = 200

# --- pools ----------------------------------------------------------------------------------------


def pool(text: str) -> list[str]:
    """A comma-separated list, written out in the order given."""
    return [item.strip() for item in text.split(",") if item.strip()]


NAMES = pool(
    """
    Aaliyah, Abdul, Ada, Adebayo, Aiko, Aisha, Alejandro, Amara, Anika, Arjun, Astrid, Beatriz, Bilal, Bruno,
    Camila, Chen, Chioma, Dara, Dmitri, Elif, Emeka, Esme, Farah, Felix, Freya, Gabriel, Grace, Hamid, Hana,
    Hugo, Imani, Ines, Ivan, Jamal, Jasmine, Javier, Jonas, Kai, Kamala, Kenji, Kofi, Lars, Leila, Liam, Lina,
    Lucia, Malik, Mateo, Maya, Mei, Mohammed, Nadia, Naomi, Niamh, Nikolai, Noah, Olga, Omar, Oscar, Pablo,
    Priya, Quentin, Rafael, Ravi, Rosa, Ruth, Sakura, Samir, Sana, Leon, Sipho, Sofia, Soren, Tariq, Thandiwe,
    Tomas, Uma, Valentina, Viktor, Wei, Yara, Yusuf, Zainab, Zara, Zoltan, Ewan, Carmen, Deepak, Fatima, Gemma
    """
)

OBJECTS = pool(
    """
    umbrella, kite, drum, lantern, teapot, violin, torch, notebook, camera, scarf, compass, hammer, ladder,
    basket, mirror, clock, guitar, helmet, pillow, kettle, blender, toaster, skateboard, telescope, backpack,
    wallet, candle, puzzle, globe, trumpet, stapler, calculator, microphone, blanket, suitcase, jigsaw,
    harmonica, magnet, whistle, paintbrush, screwdriver, thermos, frying pan, watering can, tennis racket,
    rolling pin, football, cushion, vase, radio, typewriter, shovel, saucepan, rucksack, binoculars, easel,
    ukulele, stopwatch, lunchbox, flask, doormat, hairbrush, keyboard, lamp, rake
    """
)

PLACES = pool(
    """
    kitchen, garage, attic, hallway, cellar, garden shed, spare room, car boot, top drawer, laundry room,
    pantry, basement, study, bathroom, greenhouse, office, wardrobe, cupboard, tool shed, dining room,
    living room, bedroom, utility room, playroom, conservatory, glovebox, loft, porch, sewing box, biscuit tin,
    filing cabinet, laundry basket
    """
)

COLOURS = pool(
    """
    red, blue, green, yellow, orange, purple, pink, brown, black, white, grey, silver, gold, navy, teal, beige,
    maroon, turquoise, lilac, cream
    """
)

CITIES = pool(
    """
    Lisbon, Oslo, Nairobi, Lima, Hanoi, Toronto, Cairo, Madrid, Seoul, Dublin, Buenos Aires, Cape Town, Mumbai,
    Sydney, Istanbul, Prague, Accra, Kyoto, Vienna, Bogota, Edinburgh, Manila, Helsinki, Lagos,
    Santiago de Chile, Montreal, Athens, Jakarta, Warsaw, Marrakesh, Reykjavik, Auckland, Havana, Budapest,
    Tbilisi, Kathmandu, Copenhagen, Dakar, Valencia, Glasgow, Hamburg, Osaka, Quito, Riga, Zanzibar,
    New Orleans, Porto, Tunis
    """
)

JOBS = pool(
    """
    nurse, baker, pilot, architect, electrician, plumber, teacher, journalist, dentist, farmer, chef, lawyer,
    librarian, firefighter, engineer, vet, pharmacist, carpenter, photographer, accountant, gardener,
    translator, paramedic, tailor, surveyor, optician, mechanic, florist, beekeeper, locksmith, astronomer,
    economist, potter, zookeeper, judge, midwife, barber, butcher, sailor, geologist
    """
)

GARMENTS = ["coat", "hat", "scarf", "jumper", "dress", "raincoat", "shirt", "jacket", "tie", "pair of boots"]
OWNED = ["car", "bike", "front door", "kite", "umbrella", "backpack", "tent", "boat", "mug", "phone case"]
PAINTED = pool(
    """
    fence, front door, shed, garden gate, bookcase, kitchen chairs, letterbox, bathroom, bench, window frames,
    staircase, dog kennel
    """
)

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = pool("January, February, March, April, May, June, July, August, September, October, November, December")
TIMES = [f"{h} am" for h in range(5, 12)] + ["12 pm"] + [f"{h} pm" for h in range(1, 12)]

# (noun, present tense, base form)
EVENTS = [
    ("bus", "leaves", "leave"),
    ("film", "starts", "start"),
    ("bakery", "opens", "open"),
    ("museum", "closes", "close"),
    ("meeting", "begins", "begin"),
    ("train", "arrives", "arrive"),
    ("swimming lesson", "starts", "start"),
    ("library", "opens", "open"),
    ("concert", "starts", "start"),
    ("ferry", "departs", "depart"),
    ("pharmacy", "closes", "close"),
    ("match", "kicks off", "kick off"),
    ("market", "opens", "open"),
    ("yoga class", "begins", "begin"),
    ("night bus", "leaves", "leave"),
    ("post office", "closes", "close"),
    ("tram", "arrives", "arrive"),
    ("school play", "starts", "start"),
]
APPOINTMENTS = pool(
    """
    dentist appointment, haircut, job interview, piano lesson, football practice, book club, driving test,
    parents' evening, team dinner, eye test, chess club, pottery class, vet visit, science fair
    """
)

PLURALS = pool(
    """
    cats, dogs, rabbits, hens, goats, ducks, horses, sheep, pigs, geese, parrots, tortoises, hamsters, cows,
    donkeys
    """
)
THINGS = pool(
    """
    pencils, books, stamps, marbles, apples, oranges, lemons, eggs, cups, plates, candles, buttons, shells,
    postcards, biscuits, balloons, stickers, tomatoes, spoons, keys
    """
)
CONTESTS = pool(
    """
    race, spelling bee, baking contest, chess tournament, swimming gala, quiz, talent show, cycling race,
    poetry contest, egg-and-spoon race, dance competition, sandcastle contest
    """
)
ORDINALS = ["first", "second", "third"]
GAMES = ["quiz", "darts match", "card game", "basketball game", "video game", "spelling test", "board game"]


# --- helpers --------------------------------------------------------------------------------------


def art(noun: str) -> str:
    """The noun with 'a' or 'an' ('pair of boots' -> 'a pair of boots')."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def poss(name: str) -> str:
    return name + "'s"


def pick(rng: random.Random, pool: list, k: int) -> list:
    return rng.sample(pool, k)


QA = tuple[str, str]


# --- families: each takes the rng and returns (question, answer) -----------------------------------


def who_has(rng: random.Random) -> QA:
    t = rng.randrange(4)
    if t == 0:
        (a, b), (x, y) = pick(rng, NAMES, 2), pick(rng, OBJECTS, 2)
        i = rng.randrange(2)
        return f"{a} has {art(x)} and {b} has {art(y)}. Who has the {(x, y)[i]}?", (a, b)[i]
    if t == 1:
        (a, b, c), (x, y, z) = pick(rng, NAMES, 3), pick(rng, OBJECTS, 3)
        i = rng.randrange(3)
        q = f"On the bus, {a} was holding {art(x)}, {b} {art(y)} and {c} {art(z)}. Who was holding the {(x, y, z)[i]}?"
        return q, (a, b, c)[i]
    if t == 2:
        (a, b), (x, y) = pick(rng, NAMES, 2), pick(rng, OBJECTS, 2)
        i = rng.randrange(2)
        q = f"{a} brought {art(x)} to the picnic, while {b} brought {art(y)}. Who brought the {(x, y)[i]}?"
        return q, (a, b)[i]
    (a, b, c), (x, y, z) = pick(rng, NAMES, 3), pick(rng, OBJECTS, 3)
    i = rng.randrange(3)
    q = (
        f"{a} borrowed {art(x)}, {b} borrowed {art(y)} and {c} borrowed {art(z)}. "
        f"Which of them borrowed the {(x, y, z)[i]}?"
    )
    return q, (a, b, c)[i]


def where_is(rng: random.Random) -> QA:
    t = rng.randrange(3)
    if t == 0:
        a, (x, y), (p, r) = rng.choice(NAMES), pick(rng, OBJECTS, 2), pick(rng, PLACES, 2)
        i = rng.randrange(2)
        return f"{a} keeps the {x} in the {p} and the {y} in the {r}. Where does {a} keep the {(x, y)[i]}?", (p, r)[i]
    if t == 1:
        (a, b), (x, y), (p, r) = pick(rng, NAMES, 2), pick(rng, OBJECTS, 2), pick(rng, PLACES, 2)
        i = rng.randrange(2)
        q = (
            f"{a} left {art(x)} in the {p}, and {b} left {art(y)} in the {r}. "
            f"Where did {(a, b)[i]} leave the {(x, y)[i]}?"
        )
        return q, (p, r)[i]
    (x, y, z), places = pick(rng, OBJECTS, 3), pick(rng, PLACES, 3)
    i = rng.randrange(3)
    q = (
        f"The {x} is in the {places[0]}, the {y} is in the {places[1]} and the {z} is in the {places[2]}. "
        f"Where is the {(x, y, z)[i]}?"
    )
    return q, places[i]


def colour(rng: random.Random) -> QA:
    t = rng.randrange(4)
    if t == 0:
        (a, b), v, (c1, c2) = pick(rng, NAMES, 2), rng.choice(OWNED), pick(rng, COLOURS, 2)
        i = rng.randrange(2)
        return f"{poss(a)} {v} is {c1} and {poss(b)} {v} is {c2}. What colour is {poss((a, b)[i])} {v}?", (c1, c2)[i]
    if t == 1:
        a, (x, y), (c1, c2) = rng.choice(NAMES), pick(rng, PAINTED, 2), pick(rng, COLOURS, 2)
        i = rng.randrange(2)
        verb = "are" if (x, y)[i].endswith("s") else "is"
        return f"{a} painted the {x} {c1} and the {y} {c2}. What colour {verb} the {(x, y)[i]} now?", (c1, c2)[i]
    if t == 2:
        a, (x, y, z), cs = rng.choice(NAMES), pick(rng, OBJECTS, 3), pick(rng, COLOURS, 3)
        i = rng.randrange(3)
        q = (
            f"At the shop, {a} chose {art(cs[0])} {x}, {art(cs[1])} {y} and {art(cs[2])} {z}. "
            f"What colour was the {(x, y, z)[i]}?"
        )
        return q, cs[i]
    (a, b), g, (c1, c2) = pick(rng, NAMES, 2), rng.choice(GARMENTS), pick(rng, COLOURS, 2)
    i = rng.randrange(2)
    return f"{a} wore {art(c1)} {g} and {b} wore {art(c2)} {g}. What colour was {poss((a, b)[i])} {g}?", (c1, c2)[i]


def when(rng: random.Random) -> QA:
    t = rng.randrange(4)
    if t == 0:
        (e1, e2), (t1, t2) = pick(rng, EVENTS, 2), pick(rng, TIMES, 2)
        i = rng.randrange(2)
        e = (e1, e2)[i]
        q = f"The {e1[0]} {e1[1]} at {t1} and the {e2[0]} {e2[1]} at {t2}. What time does the {e[0]} {e[2]}?"
        return q, (t1, t2)[i]
    if t == 1:
        (a, b), (t1, t2) = pick(rng, NAMES, 2), pick(rng, TIMES, 2)
        i = rng.randrange(2)
        q = f"{poss(a)} flight lands at {t1}, and {poss(b)} lands at {t2}. When does {poss((a, b)[i])} flight land?"
        return q, (t1, t2)[i]
    if t == 2:
        a, (x, y), (d1, d2) = rng.choice(NAMES), pick(rng, APPOINTMENTS, 2), pick(rng, DAYS, 2)
        i = rng.randrange(2)
        return f"{poss(a)} {x} is on {d1} and the {y} is on {d2}. On which day is the {(x, y)[i]}?", (d1, d2)[i]
    (a, b, c), ts = pick(rng, NAMES, 3), pick(rng, TIMES, 3)
    i = rng.randrange(3)
    q = f"{a} woke up at {ts[0]}, {b} at {ts[1]} and {c} at {ts[2]}. What time did {(a, b, c)[i]} wake up?"
    return q, ts[i]


def city(rng: random.Random) -> QA:
    t = rng.randrange(3)
    if t == 0:
        (a, b), (c1, c2) = pick(rng, NAMES, 2), pick(rng, CITIES, 2)
        i = rng.randrange(2)
        return f"{a} lives in {c1} and {b} lives in {c2}. Where does {(a, b)[i]} live?", (c1, c2)[i]
    if t == 1:
        (a, b, c), cs = pick(rng, NAMES, 3), pick(rng, CITIES, 3)
        i = rng.randrange(3)
        q = (
            f"Last summer {a} flew to {cs[0]}, {b} took the train to {cs[1]} and {c} drove to {cs[2]}. "
            f"Where did {(a, b, c)[i]} go?"
        )
        return q, cs[i]
    a, (c1, c2) = rng.choice(NAMES), pick(rng, CITIES, 2)
    if rng.randrange(2) == 0:
        return f"{a} was born in {c1} but now works in {c2}. Where was {a} born?", c1
    return f"{a} was born in {c1} but now works in {c2}. Where does {a} work now?", c2


def job(rng: random.Random) -> QA:
    t = rng.randrange(3)
    if t == 0:
        (a, b), (j1, j2) = pick(rng, NAMES, 2), pick(rng, JOBS, 2)
        i = rng.randrange(2)
        if rng.randrange(2) == 0:
            return f"{a} works as {art(j1)} and {b} works as {art(j2)}. Who is the {(j1, j2)[i]}?", (a, b)[i]
        return f"{a} works as {art(j1)} and {b} works as {art(j2)}. What is {poss((a, b)[i])} job?", (j1, j2)[i]
    if t == 1:
        (a, b, c), js = pick(rng, NAMES, 3), pick(rng, JOBS, 3)
        i = rng.randrange(3)
        q = (
            f"At the reunion, {a} turned out to be {art(js[0])}, {b} {art(js[1])} and {c} {art(js[2])}. "
            f"Who is the {js[i]}?"
        )
        return q, (a, b, c)[i]
    a, (j1, j2) = rng.choice(NAMES), pick(rng, JOBS, 2)
    if rng.randrange(2) == 0:
        return f"{a} trained as {art(j1)} but now works as {art(j2)}. What did {a} train as?", j1
    return f"{a} trained as {art(j1)} but now works as {art(j2)}. What does {a} work as now?", j2


def bought(rng: random.Random) -> QA:
    t = rng.randrange(4)
    if t == 0:
        (a, b), (x, y) = pick(rng, NAMES, 2), pick(rng, OBJECTS, 2)
        i = rng.randrange(2)
        return f"At the market, {a} bought {art(x)} and {b} bought {art(y)}. What did {(a, b)[i]} buy?", (x, y)[i]
    if t == 1:
        (a, b, c), (x, y) = pick(rng, NAMES, 3), pick(rng, OBJECTS, 2)
        i = rng.randrange(2)
        q = f"For {poss(a)} birthday, {b} gave {art(x)} and {c} gave {art(y)}. What did {(b, c)[i]} give?"
        return q, (x, y)[i]
    if t == 2:
        a, (x, y), (d1, d2) = rng.choice(NAMES), pick(rng, OBJECTS, 2), sorted(pick(rng, DAYS, 2), key=DAYS.index)
        i = rng.randrange(2)
        return f"{a} lost {art(x)} on {d1} and {art(y)} on {d2}. What did {a} lose on {(d1, d2)[i]}?", (x, y)[i]
    (a, b, c), objs = pick(rng, NAMES, 3), pick(rng, OBJECTS, 3)
    i = rng.randrange(3)
    q = (
        f"At the jumble sale, {a} sold {art(objs[0])}, {b} sold {art(objs[1])} and {c} sold {art(objs[2])}. "
        f"What did {(a, b, c)[i]} sell?"
    )
    return q, objs[i]


def compare(rng: random.Random) -> QA:
    t = rng.randrange(5)
    if t == 0:
        (a, b), (n1, n2) = pick(rng, NAMES, 2), pick(rng, list(range(6, 90)), 2)
        more = rng.randrange(2) == 0
        ans = a if (n1 > n2) == more else b
        return f"{a} is {n1} years old and {b} is {n2}. Who is {'older' if more else 'younger'}?", ans
    if t == 1:
        names, ns = pick(rng, NAMES, 3), pick(rng, list(range(6, 90)), 3)
        more = rng.randrange(2) == 0
        ans = names[ns.index(max(ns) if more else min(ns))]
        q = (
            f"{names[0]} is {ns[0]}, {names[1]} is {ns[1]} and {names[2]} is {ns[2]}. "
            f"Who is the {'oldest' if more else 'youngest'}?"
        )
        return q, ans
    if t == 2:
        (a, b), (n1, n2), contest = pick(rng, NAMES, 2), pick(rng, list(range(3, 60)), 2), rng.choice(GAMES)
        more = rng.randrange(2) == 0
        ans = a if (n1 > n2) == more else b
        word = "more" if more else "fewer"
        q = f"In the {contest}, {a} scored {n1} points and {b} scored {n2}. Who scored {word} points?"
        return q, ans
    if t == 3:
        (a, b), (n1, n2) = pick(rng, NAMES, 2), pick(rng, list(range(140, 200)), 2)
        more = rng.randrange(2) == 0
        ans = a if (n1 > n2) == more else b
        return f"{a} is {n1} cm tall and {b} is {n2} cm tall. Who is {'taller' if more else 'shorter'}?", ans
    (a, b), (n1, n2) = pick(rng, NAMES, 2), pick(rng, list(range(2, 50)), 2)
    more = rng.randrange(2) == 0
    ans = a if (n1 > n2) == more else b
    return f"This week {a} ran {n1} km and {b} ran {n2} km. Who ran {'further' if more else 'less far'}?", ans


def count(rng: random.Random) -> QA:
    t = rng.randrange(4)
    if t == 0:
        a, (p1, p2), (n1, n2) = rng.choice(NAMES), pick(rng, PLURALS, 2), pick(rng, list(range(2, 17)), 2)
        i = rng.randrange(2)
        return f"{a} has {n1} {p1} and {n2} {p2}. How many {(p1, p2)[i]} does {a} have?", str((n1, n2)[i])
    if t == 1:
        ps, ns = pick(rng, THINGS, 3), pick(rng, list(range(2, 30)), 3)
        i = rng.randrange(3)
        q = (
            f"In the box there are {ns[0]} {ps[0]}, {ns[1]} {ps[1]} and {ns[2]} {ps[2]}. "
            f"How many {ps[i]} are in the box?"
        )
        return q, str(ns[i])
    if t == 2:
        (p1, p2), (n1, n2) = pick(rng, PLURALS, 2), pick(rng, list(range(2, 40)), 2)
        i = rng.randrange(2)
        return f"The farm has {n1} {p1} and {n2} {p2}. How many {(p1, p2)[i]} does the farm have?", str((n1, n2)[i])
    a, (m1, m2) = rng.choice(NAMES), sorted(pick(rng, MONTHS, 2), key=MONTHS.index)
    n1, n2 = pick(rng, list(range(2, 21)), 2)
    i = rng.randrange(2)
    q = f"{a} read {n1} books in {m1} and {n2} in {m2}. How many books did {a} read in {(m1, m2)[i]}?"
    return q, str((n1, n2)[i])


def order(rng: random.Random) -> QA:
    t = rng.randrange(4)
    names, contest = pick(rng, NAMES, 3), rng.choice(CONTESTS)
    i = rng.randrange(3)
    if t == 0:
        q = (
            f"In the {contest}, {names[0]} finished first, {names[1]} second and {names[2]} third. "
            f"Who finished {ORDINALS[i]}?"
        )
        return q, names[i]
    if t == 1:
        places = pick(rng, ORDINALS, 3)
        q = (
            f"{names[0]} came {places[0]} in the {contest}, {names[1]} came {places[1]} and {names[2]} came "
            f"{places[2]}. Who came {ORDINALS[i]}?"
        )
        return q, names[places.index(ORDINALS[i])]
    if t == 2:
        q = (
            f"The queue at the bakery was {names[0]}, then {names[1]}, then {names[2]}. "
            f"Who was {ORDINALS[i]} in the queue?"
        )
        return q, names[i]
    ask = ("first", "second", "last")[i]
    q = f"{names[0]} arrived at the party first, {names[1]} came next and {names[2]} arrived last. Who arrived {ask}?"
    return q, names[i]


def add(rng: random.Random) -> QA:
    t = rng.randrange(3)
    n1, n2, p = rng.randint(2, 9), rng.randint(2, 9), rng.choice(THINGS)
    if t == 0:
        a = rng.choice(NAMES)
        return f"{a} has {n1} {p} and buys {n2} more. How many {p} does {a} have now?", str(n1 + n2)
    if t == 1:
        q = f"There are {n1} {p} on the top shelf and {n2} on the bottom shelf. How many {p} are there in total?"
        return q, str(n1 + n2)
    a, b = pick(rng, NAMES, 2)
    return f"{a} found {n1} {p} and {b} found {n2}. How many {p} did they find altogether?", str(n1 + n2)


# family -> (generator, number of pairs)
FAMILIES: dict[str, tuple[Callable[[random.Random], QA], int]] = {
    "who_has": (who_has, 70),
    "where_is": (where_is, 70),
    "colour": (colour, 60),
    "when": (when, 60),
    "city": (city, 55),
    "job": (job, 55),
    "bought": (bought, 60),
    "compare": (compare, 70),
    "count": (count, 60),
    "order": (order, 55),
    "add": (add, 35),
}


def build_pairs(seed: int = SEED) -> list[dict[str, str]]:
    """All pairs, shuffled: each family's quota, no question repeated (case-insensitively)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for gen, quota in FAMILIES.values():
        made = 0
        while made < quota:
            question, answer = gen(rng)
            key = question.casefold()
            if key in seen:
                continue
            if len(question) >= MAX_QUESTION_CHARS:
                raise ValueError(f"question too long ({len(question)} chars): {question}")
            seen.add(key)
            rows.append({"Question": question, "Best Answer": answer})
            made += 1
    rng.shuffle(rows)
    return rows


# The system message of every conversation in the chat-format copy.
SYSTEM = "Answer with a word or a short phrase taken from the question."


def conversations(rows: list[dict[str, str]]) -> list[dict[str, list[dict[str, str]]]]:
    """The pairs in OpenAI's chat format: two questions in turn per conversation, after a system message."""
    out = []
    for i in range(0, len(rows), 2):
        messages = [{"role": "system", "content": SYSTEM}]
        for row in rows[i : i + 2]:
            messages += [
                {"role": "user", "content": row["Question"]},
                {"role": "assistant", "content": row["Best Answer"]},
            ]
        out.append({"messages": messages})
    return out


def render(rows: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write here instead of to standard output")
    parser.add_argument("--chat", action="store_true", help="the same pairs as two-turn conversations")
    args = parser.parse_args(argv)
    data = render(conversations(build_pairs()) if args.chat else build_pairs())
    if args.out:
        args.out.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


if __name__ == "__main__":
    main()
