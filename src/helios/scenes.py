"""The colour/shape vocabulary of the synthetic bouncing-shapes videos, shared by the training
data generator (which draws them) and the evaluator (which checks them).

    "two red circles bouncing on a blue background"
    -> Scene(objects=[ObjectSpec(count=2, color="red", shape="circle")], background="blue")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
SHAPES: tuple[str, ...] = ("circle", "square")
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


def caption_vocabulary() -> list[str]:
    """Every word describe_scene writes: what a model trained on its captions has seen."""
    words = {"a", "and", "bouncing", "on", "background", *NUMBER_WORDS.values(), *COLORS}
    words.update(w for s in SHAPES for w in (s, s + "s"))
    return sorted(words)


EXAMPLE_CAPTION = "two red circles bouncing on a blue background"


def describe_scene(scene: Scene, verb: str = "bouncing") -> str:
    """Inverse of parse_caption: Scene -> 'two red circles and a green square bouncing on a blue background'."""
    parts = []
    for o in scene.objects:
        n = o.count if o.count is not None else 2
        noun = o.shape if n == 1 else o.shape + "s"
        num = "a" if n == 1 else NUMBER_WORDS.get(n, str(n))
        parts.append(f"{num} {o.color} {noun}")
    text = " and ".join(parts) if parts else "nothing"
    if scene.background:
        text += f" {verb} on a {scene.background} background"
    return text
