"""The model's fixed vocabulary and prompt tokeniser.

Prompts are free text; only words in this vocabulary reach the network, everything else is
ignored. Each prompt resolves to exactly one colour, one shape and one direction token: what
the prompt does not name is drawn from the seed, so a bare prompt still gives a definite,
reproducible clip instead of the blurred average of every option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta", "pink", "white")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

# One embedding row per canonical token; the order is baked into the trained weights.
TOKENS: tuple[str, ...] = COLOURS + SHAPES + DIRECTIONS
TOKEN_ID = {token: index for index, token in enumerate(TOKENS)}
COLOUR_IDS = tuple(TOKEN_ID[c] for c in COLOURS)
SHAPE_IDS = tuple(TOKEN_ID[s] for s in SHAPES)
DIRECTION_IDS = tuple(TOKEN_ID[d] for d in DIRECTIONS)

SYNONYMS = {
    "violet": "purple", "fuchsia": "magenta", "aqua": "cyan", "turquoise": "cyan",
    "ball": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "round": "circle",
    "box": "square", "block": "square", "cube": "square",
    "triangular": "triangle",
    "leftward": "left", "leftwards": "left", "west": "left", "westward": "left",
    "rightward": "right", "rightwards": "right", "east": "right", "eastward": "right",
    "upward": "up", "upwards": "up", "rising": "up", "north": "up", "northward": "up",
    "downward": "down", "downwards": "down", "falling": "down", "south": "down", "southward": "down",
}

# Words that carry no attribute but are expected in prompts: not worth a warning.
FILLER = frozenset(
    "a an the it its is in on of to and with that this make turn paint colour color recolor recolour "
    "change into be now please moving moves move going goes travelling traveling sliding slides "
    "drifting drifts across towards toward from side screen frame background dark black video clip "
    "shape object one small big large little".split()
)

_WORD = re.compile(r"[a-z]+")


def canonical(word: str) -> str | None:
    word = SYNONYMS.get(word, word)
    if word in TOKEN_ID:
        return word
    # Cheap plural handling ("circles", "squares") without a stemmer.
    if word.endswith("s") and SYNONYMS.get(word[:-1], word[:-1]) in TOKEN_ID:
        return SYNONYMS.get(word[:-1], word[:-1])
    return None


@dataclass
class ParsedPrompt:
    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The last word of each kind wins: "turn the red circle blue" means blue."""
    parsed = ParsedPrompt()
    seen: dict[str, list[str]] = {"colour": [], "shape": [], "direction": []}
    for word in _WORD.findall(prompt.lower()):
        token = canonical(word)
        if token is None:
            if word not in FILLER and word not in parsed.unknown:
                parsed.unknown.append(word)
            continue
        kind = "colour" if token in COLOURS else "shape" if token in SHAPES else "direction"
        if token not in seen[kind]:
            seen[kind].append(token)
        setattr(parsed, kind, token)
    parsed.conflicts = {kind: values for kind, values in seen.items() if len(values) > 1}
    return parsed
