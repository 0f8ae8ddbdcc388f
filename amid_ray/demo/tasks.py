"""Synthetic instruction tasks with exact reference answers: the embedded demo's data.

Every task family is a small function that draws one task from a seeded `random.Random`, so the
same seed always gives the same examples. Answers are short (a few words) and computed, never
looked up, so they are correct by construction. Rows are written in MiniLLM's JSONL format
(`instruction`, `input`, `output`, `prompt`, `topic`), the format the project's training and
evaluation code reads.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from amid_ray.atomic import write_text_atomic
from amid_ray.data import build_prompt


class Task(NamedTuple):
    """One drawn task before it is given its Alpaca prompt."""

    instruction: str
    input: str
    output: str


TaskFamily = Callable[[random.Random], Task]

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ivy", "Jack",
         "Lena", "Marco", "Nora", "Omar", "Paula", "Sam")
COUNTABLE_ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies",
                   "stamps", "cards", "shells")
WORDS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
         "cat", "dog", "horse", "lion", "mouse", "tiger", "zebra", "eagle", "shark", "whale",
         "red", "blue", "green", "yellow", "purple", "silver", "river", "mountain", "forest",
         "desert", "island", "garden", "window", "table", "chair", "pencil", "rocket", "guitar")
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
            "open": "closed", "up": "down", "early": "late", "full": "empty", "hard": "soft",
            "high": "low", "old": "young", "rich": "poor", "strong": "weak", "wet": "dry",
            "long": "short", "loud": "quiet", "clean": "dirty", "easy": "difficult",
            "thick": "thin", "cheap": "expensive", "near": "far", "true": "false", "win": "lose",
            "day": "night", "buy": "sell", "push": "pull", "begin": "end", "give": "take",
            "inside": "outside", "first": "last", "heavy": "light", "wide": "narrow",
            "sweet": "sour", "safe": "dangerous", "friend": "enemy", "question": "answer",
            "love": "hate", "always": "never", "north": "south"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people", "leaf": "leaves",
           "knife": "knives", "wolf": "wolves", "box": "boxes", "bus": "buses", "dish": "dishes",
           "church": "churches", "city": "cities", "baby": "babies", "story": "stories",
           "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars",
           "house": "houses", "river": "rivers", "sheep": "sheep", "fish": "fish", "deer": "deer",
           "potato": "potatoes", "hero": "heroes", "cactus": "cacti", "ox": "oxen"}
UNIT_CONVERSIONS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100),
                    ("kilograms", "grams", 1000), ("liters", "milliliters", 1000),
                    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
                    ("weeks", "days", 7), ("years", "months", 12), ("tonnes", "kilograms", 1000))
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
EMAIL_USERS = ("anna", "ben", "carla", "david", "emma", "grace", "jack", "lena", "marco", "nora",
               "omar", "sam", "info", "sales", "office", "team")
EMAIL_DOMAINS = ("example.com", "mail.org", "company.net", "school.edu")
EMAIL_SENTENCES = ("Please send the report to {email} before Friday.",
                   "You can reach {name} at {email} for more details.",
                   "Questions about the order should go to {email}.",
                   "{name} wrote from {email} yesterday.")
PRICE_SENTENCES = ("The {thing} costs {value} dollars at the market.",
                   "{name} paid {value} dollars for a new {thing}.",
                   "A {thing} is on sale today for {value} dollars.")
PRICED_THINGS = ("jacket", "lamp", "bicycle", "backpack", "kettle", "clock", "camera", "ticket")


def _listing(items: Iterable[object]) -> str:
    return ", ".join(str(item) for item in items)


def _pick_words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def arithmetic(rng: random.Random) -> Task:
    """A one-step addition or subtraction word problem with small numbers; the answer."""
    name, item = rng.choice(NAMES), rng.choice(COUNTABLE_ITEMS)
    first, second = rng.randint(2, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        problem = f"{name} has {first} {item} and gets {second} more. How many {item} now?"
        answer = first + second
    else:
        first += second
        problem = f"{name} has {first} {item} and gives away {second}. How many {item} are left?"
        answer = first - second
    if rng.random() < 0.5:
        return Task(problem, "", str(answer))
    return Task("Solve the following word problem.", problem, str(answer))


def sort_numbers(rng: random.Random) -> Task:
    """Sort 3-6 distinct numbers ascending or descending."""
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    descending = rng.random() < 0.5
    order = "largest to smallest" if descending else "smallest to largest"
    return Task(f"Sort these numbers from {order}.", _listing(numbers),
                _listing(sorted(numbers, reverse=descending)))


def sort_words(rng: random.Random) -> Task:
    """Sort 3-5 words alphabetically."""
    words = _pick_words(rng)
    instruction = rng.choice(("Sort the following words alphabetically.",
                              "Put these words in alphabetical order."))
    return Task(instruction, _listing(words), _listing(sorted(words)))


def unit_conversion(rng: random.Random) -> Task:
    """Convert a whole quantity to a smaller unit; the answer is the value and the unit."""
    source, target, factor = rng.choice(UNIT_CONVERSIONS)
    value = rng.randint(2, 99)
    question = rng.choice(("Convert {value} {source} to {target}.",
                           "How many {target} are in {value} {source}?"))
    return Task(question.format(value=value, source=source, target=target), "",
                f"{value * factor} {target}")


def _random_date(rng: random.Random) -> datetime.date:
    start = datetime.date(1990, 1, 1).toordinal()
    return datetime.date.fromordinal(rng.randint(start, start + 40 * 365))


def date_format(rng: random.Random) -> Task:
    """Rewrite an ISO date as DD/MM/YYYY or in words."""
    date = _random_date(rng)
    if rng.random() < 0.5:
        return Task("Rewrite the date in the format DD/MM/YYYY.", date.isoformat(),
                    date.strftime("%d/%m/%Y"))
    return Task("Write this date in words.", date.isoformat(),
                f"{date.day} {MONTHS[date.month - 1]} {date.year}")


def extract_email(rng: random.Random) -> Task:
    """Find the e-mail address in a sentence.

    Addresses stay at most six GPT-2 tokens long: the evaluation protocol's no-repeat-ngram-6
    rule also sees the prompt, so it would forbid copying a longer one.
    """
    email = f"{rng.choice(EMAIL_USERS)}@{rng.choice(EMAIL_DOMAINS)}"
    sentence = rng.choice(EMAIL_SENTENCES).format(name=rng.choice(NAMES), email=email)
    return Task("Extract the email address from the sentence.", sentence, email)


def extract_number(rng: random.Random) -> Task:
    """Find the price (below 100 dollars) in a sentence."""
    value = rng.randint(5, 99)
    sentence = rng.choice(PRICE_SENTENCES).format(
        thing=rng.choice(PRICED_THINGS), value=value, name=rng.choice(NAMES))
    return Task("What is the price in dollars mentioned in this sentence?", sentence, str(value))


def count_items(rng: random.Random) -> Task:
    """Count the items of a comma-separated list."""
    words = _pick_words(rng, 2, 8)
    return Task("How many items are in the following list?", _listing(words), str(len(words)))


def reverse_list(rng: random.Random) -> Task:
    """Reverse the order of a word list."""
    words = _pick_words(rng)
    return Task("Reverse the order of these words.", _listing(words), _listing(reversed(words)))


def capitalize(rng: random.Random) -> Task:
    """Write words in upper case or title case."""
    phrase = " ".join(_pick_words(rng, 2, 4))
    if rng.random() < 0.5:
        return Task("Write the following words in capital letters.", phrase, phrase.upper())
    return Task("Capitalize the first letter of each word.", phrase, phrase.title())


def compare_numbers(rng: random.Random) -> Task:
    """Name the larger or the smaller of two numbers below 100."""
    first, second = rng.sample(range(1, 100), 2)
    if rng.random() < 0.5:
        return Task(f"Which number is larger, {first} or {second}?", "", str(max(first, second)))
    return Task(f"Which number is smaller, {first} or {second}?", "", str(min(first, second)))


def _look_up_words(rng: random.Random, table: dict[str, str], one_word: str,
                   several_words: str) -> Task:
    """One to three keys of `table` and their values; `one_word` asks about a single `{word}`."""
    words = rng.sample(sorted(table), rng.randint(1, 3))
    answer = _listing(table[word] for word in words)
    if len(words) == 1:
        return Task(one_word.format(word=words[0]), "", answer)
    return Task(several_words, _listing(words), answer)


def antonyms(rng: random.Random) -> Task:
    """Give the opposite of one to three words."""
    return _look_up_words(rng, ANTONYMS, 'What is the opposite of the word "{word}"?',
                          "Give the opposite of each word.")


def plurals(rng: random.Random) -> Task:
    """Give the plural of one to three nouns."""
    return _look_up_words(rng, PLURALS, 'What is the plural of "{word}"?',
                          "Write the plural form of each noun.")


def weekday_arithmetic(rng: random.Random) -> Task:
    """Which weekday it is some days after or before a given weekday."""
    today, days = rng.randrange(7), rng.randint(1, 60)
    if rng.random() < 0.5:
        question = f"If today is {WEEKDAYS[today]}, what day of the week will it be in {days} days?"
        return Task(question, "", WEEKDAYS[(today + days) % 7])
    question = f"If today is {WEEKDAYS[today]}, what day of the week was it {days} days ago?"
    return Task(question, "", WEEKDAYS[(today - days) % 7])


FAMILIES: dict[str, TaskFamily] = {family.__name__: family for family in (
    arithmetic, sort_numbers, sort_words, unit_conversion, date_format, extract_email,
    extract_number, count_items, reverse_list, capitalize, compare_numbers, antonyms, plurals,
    weekday_arithmetic)}
TASK_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

# Draws per example before a family is declared unable to produce a new distinct task.
MAX_DRAWS = 1000


def _copies_a_long_run(task: Task, run: int = 2) -> bool:
    """Whether the answer repeats `run` consecutive items of the input list in the same order.

    Such an answer (an already sorted stretch, unchanged plurals) may need a 6-token copy of
    the prompt, which the evaluation protocol's no-repeat-ngram-6 rule forbids. Input and
    answer both follow a "...:\n" line, so a shared start counts as one more shared item.
    """
    source = ["<start>", *task.input.split(", ")]
    answer = ["<start>", *task.output.split(", ")]
    runs = {tuple(source[start:start + run]) for start in range(len(source) - run + 1)}
    return any(tuple(answer[start:start + run]) in runs for start in range(len(answer) - run + 1))


def _distinct_task(family: str, rng: random.Random, seen: set[tuple[str, str]]) -> Task:
    for _ in range(MAX_DRAWS):
        task = FAMILIES[family](rng)
        if (task.instruction, task.input) not in seen and not _copies_a_long_run(task):
            seen.add((task.instruction, task.input))
            return task
    raise ValueError(f"task family {family!r} cannot produce more distinct examples; ask for fewer")


def _row(task: Task, family: str) -> dict[str, str]:
    return {"instruction": task.instruction, "input": task.input, "output": task.output,
            "prompt": build_prompt(task.instruction, task.input), "topic": family}


def generate_examples(n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct MiniLLM rows, cycling through the families in order.

    Rows come in round-robin family order, so any contiguous slice is balanced across families,
    and the first `k` rows for a seed do not depend on `n`. No two rows share a prompt.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows = []
    for index in range(n):
        family = TASK_FAMILIES[index % len(TASK_FAMILIES)]
        rows.append(_row(_distinct_task(family, rng, seen), family))
    return rows


def write_demo_splits(folder: str | Path, *, n_train: int, n_dev: int, n_test: int,
                      seed: int) -> dict[str, Path]:
    """Write disjoint, balanced, shuffled `train/dev/test.jsonl` splits into `folder`.

    The test split is carved first, so it stays the same when only `n_train` or `n_dev` change.
    Each file is written atomically (`amid_ray.atomic`): complete or absent.
    """
    folder = Path(folder)
    rows = generate_examples(n_test + n_dev + n_train, seed)
    bounds = {"test": (0, n_test), "dev": (n_test, n_test + n_dev),
              "train": (n_test + n_dev, len(rows))}
    paths = {}
    for split, (start, stop) in bounds.items():
        split_rows = rows[start:stop]
        random.Random(f"{seed}-{split}").shuffle(split_rows)
        paths[split] = write_text_atomic(
            folder / f"{split}.jsonl",
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows))
    return paths
