"""The colour/shape vocabulary of the synthetic bouncing-shapes videos, shared by the training
data generator (which draws them) and the evaluator (which checks them).

    "two red circles bouncing on a blue background"
    -> Scene(objects=[ObjectSpec(count=2, color="red", shape="circle")], background="blue")

Two caption grammars. "classic" (the bundled model's training captions) writes one form,
"<objects> bouncing on a <colour> background", with circles and squares. "wide" adds triangles, other
motion words or none ("moving", "floating", "drifting", "bouncing"), "on" or "over", and the background
first ("on a blue background, two red circles", "a blue background with two red circles drifting").
The parser reads every form of both: it looks for '<count> <colour> <shape>' and '<colour> background'
wherever they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# The one colour table. Values are chosen far apart (min pairwise RGB distance 127) so they
# stay separable after lossy video coding.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 128, 0),
    "purple": (128, 0, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # every shape a caption may name
CLASSIC_SHAPES: tuple[str, ...] = ("circle", "square")  # the classic grammar's (the bundled model's)
GRAMMARS: tuple[str, ...] = ("classic", "wide")
MOTION_WORDS: tuple[str, ...] = ("moving", "floating", "drifting", "bouncing")  # wide grammar; or none
PLACE_WORDS: tuple[str, ...] = ("on", "over")
ORDERS: tuple[str, ...] = ("objects", "background", "background_with")  # what the caption names first
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class ObjectSpec:
    count: int | None  # None: plural with no number ("red circles")
    color: str
    shape: str


@dataclass
class Scene:
    objects: list[ObjectSpec] = field(default_factory=list)
    background: str | None = None


def _singular(word: str) -> str | None:
    for s in SHAPES:
        if word in (s, s + "s"):
            return s
    return None


def parse_caption(caption: str) -> Scene:
    """Extract '<count> <colour> <shape>' objects and the '<colour> background' from a caption.

    Counts: a/an/one..five or digits. Unknown words are ignored, so captions may carry extra text.
    """
    words = re.findall(r"[a-z]+|\d+", caption.lower())
    scene = Scene()
    for i, w in enumerate(words):
        if w == "background":
            # nearest colour among the two words before: "a blue background", "blue coloured background"
            for j in (i - 1, i - 2):
                if j >= 0 and words[j] in COLORS:
                    scene.background = words[j]
                    break
            continue
        shape = _singular(w)
        if shape is None or i == 0 or words[i - 1] not in COLORS:
            continue
        color = words[i - 1]
        count = None
        if i >= 2:
            prev = words[i - 2]
            count = int(prev) if prev.isdigit() else COUNT_WORDS.get(prev)
        if count is None and w == shape:  # singular noun without a count word: one object
            count = 1
        scene.objects.append(ObjectSpec(count=count, color=color, shape=shape))
    return scene


def caption_vocabulary(grammar: str = "classic") -> list[str]:
    """Every word describe_scene writes in `grammar`: what a model trained on its captions has seen."""
    check_grammar(grammar)
    words = {"a", "and", "bouncing", "on", "background", *NUMBER_WORDS.values(), *COLORS}
    shapes = CLASSIC_SHAPES if grammar == "classic" else SHAPES
    words.update(w for s in shapes for w in (s, s + "s"))
    if grammar == "wide":
        words.update({*MOTION_WORDS, *PLACE_WORDS, "with"})
    return sorted(words)


def check_grammar(grammar: str) -> None:
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown caption grammar {grammar!r}; known: {', '.join(GRAMMARS)}")


def grammar_shapes(grammar: str) -> tuple[str, ...]:
    """The shapes the scenes of a caption grammar draw."""
    check_grammar(grammar)
    return CLASSIC_SHAPES if grammar == "classic" else SHAPES


@dataclass(frozen=True)
class CaptionForm:
    """How a caption is worded: motion word (None: none), place word, and what comes first."""

    motion: str | None = "bouncing"
    place: str = "on"
    order: str = "objects"

    def __post_init__(self):
        if self.motion is not None and self.motion not in MOTION_WORDS:
            raise ValueError(f"motion word {self.motion!r} not one of {MOTION_WORDS} (or None)")
        if self.place not in PLACE_WORDS:
            raise ValueError(f"place word {self.place!r} not one of {PLACE_WORDS}")
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r} not one of {ORDERS}")


CLASSIC_FORM = CaptionForm()
WIDE_FORMS: tuple[CaptionForm, ...] = tuple(
    CaptionForm(motion, place, order)
    for order in ORDERS for place in PLACE_WORDS for motion in (*MOTION_WORDS, None)
    if not (order == "background_with" and place != "on")  # "a blue background with ...": no place word
)


EXAMPLE_CAPTION = "two red circles bouncing on a blue background"


def describe_scene(scene: Scene, verb: str = "bouncing", form: CaptionForm | None = None) -> str:
    """Inverse of parse_caption: Scene -> 'two red circles and a green square bouncing on a blue background'
    (`form` None: that classic form with `verb`; else the wording `form` says)."""
    form = form or CaptionForm(verb, "on", "objects")
    parts = []
    for o in scene.objects:
        n = o.count if o.count is not None else 2
        noun = o.shape if n == 1 else o.shape + "s"
        num = "a" if n == 1 else NUMBER_WORDS.get(n, str(n))
        parts.append(f"{num} {o.color} {noun}")
    objects = " and ".join(parts) if parts else "nothing"
    moving = f"{objects} {form.motion}" if form.motion else objects
    if not scene.background:
        return moving
    if form.order == "background":
        return f"{form.place} a {scene.background} background, {moving}"
    if form.order == "background_with":
        return f"a {scene.background} background with {moving}"
    return f"{moving} {form.place} a {scene.background} background"


def shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which pixels a shape of size `r` covers, from their offsets (dx, dy) from its centre: a circle of
    radius r, a square of half side r, or a triangle pointing up with the square's top centre as apex and
    its bottom side as base. The renderer draws with it and the shape metric compares against it."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (2 * np.abs(dx) <= dy + r)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
