"""A generated instruction data set that needs no download and that a small model visibly learns in minutes.

Eight kinds of exact, checkable tasks (sorting, reversing, arithmetic, casing, counting, ...), phrased as Alpaca
records. Deterministic in the seed. Used by the README's offline demo and by tests.
"""

from __future__ import annotations

import random

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "mirror",
    "candle",
    "forest",
    "window",
    "silver",
    "ocean",
    "pencil",
    "rocket",
    "summer",
    "violin",
    "harbor",
    "meadow",
    "lantern",
    "copper",
    "falcon",
    "island",
    "orchard",
    "thunder",
    "velvet",
    "compass",
    "glacier",
    "ribbon",
    "saddle",
    "tunnel",
    "walnut",
]


def _task(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(8)
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
    words = rng.sample(WORDS, rng.randint(3, 5))
    if kind == 0:
        return {
            "instruction": "Sort these numbers from smallest to largest.",
            "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, sorted(nums))),
        }
    if kind == 1:
        return {
            "instruction": "Reverse the order of these words.",
            "input": " ".join(words),
            "output": " ".join(reversed(words)),
        }
    if kind == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {
            "instruction": "Add the two numbers and give only the result.",
            "input": f"{a} + {b}",
            "output": str(a + b),
        }
    if kind == 3:
        return {
            "instruction": "Rewrite the words in capital letters.",
            "input": " ".join(words),
            "output": " ".join(words).upper(),
        }
    if kind == 4:
        return {
            "instruction": "How many words are in the list? Answer with a number.",
            "input": " ".join(words),
            "output": str(len(words)),
        }
    if kind == 5:
        return {
            "instruction": "Give the largest number in the list.",
            "input": ", ".join(map(str, nums)),
            "output": str(max(nums)),
        }
    if kind == 6:
        return {
            "instruction": "Put these words in alphabetical order.",
            "input": ", ".join(words),
            "output": ", ".join(sorted(words)),
        }
    return {
        "instruction": "Write the first letter of each word.",
        "input": " ".join(words),
        "output": "".join(w[0] for w in words),
    }


def synthetic_records(num_examples: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [_task(rng) for _ in range(num_examples)]
