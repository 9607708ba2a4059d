"""Prompt schedules: a different prompt from a given chunk on, optionally blended over a few chunks.

Blending follows the official interactive mode: at a switch at chunk s with `blend` = n >= 2,
chunks s .. s+n-1 use lerp(previous, new, linspace(0, 1, n)[chunk - s]) of the prompt embeddings.
With blend 0 or 1 the new prompt applies from chunk s on.
"""

from __future__ import annotations

from dataclasses import dataclass


class PromptScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class PromptSchedule:
    entries: tuple[tuple[int, str], ...]  # (first chunk, prompt), chunk 0 first, strictly increasing
    blend: int = 0

    def __post_init__(self) -> None:
        if not self.entries:
            raise PromptScheduleError("a prompt schedule needs at least one prompt")
        starts = [s for s, _ in self.entries]
        if starts[0] != 0:
            raise PromptScheduleError(f"the first prompt must start at chunk 0, got chunk {starts[0]}")
        for a, b in zip(starts, starts[1:]):
            if b <= a:
                raise PromptScheduleError(f"prompt schedule is out of order: chunk {b} comes after chunk {a}; "
                                          "list prompts by increasing start chunk, one prompt per chunk")
        for s, p in self.entries:
            if not isinstance(p, str) or not p.strip():
                raise PromptScheduleError(f"the prompt for chunk {s} is empty: describe the video in words")
        if self.blend < 0:
            raise PromptScheduleError(f"blend must be >= 0 chunks, got {self.blend}")

    @classmethod
    def coerce(cls, prompt: "str | PromptSchedule | list[tuple[int, str]]") -> "PromptSchedule":
        if isinstance(prompt, PromptSchedule):
            return prompt
        if isinstance(prompt, str):
            return cls(((0, prompt),))
        if isinstance(prompt, (list, tuple)):
            return cls(tuple((int(s), p) for s, p in prompt))
        raise PromptScheduleError(f"prompt must be a string or a schedule, got {type(prompt).__name__}")

    @classmethod
    def parse(cls, specs: list[str], blend: int = 0) -> "PromptSchedule":
        """From CLI strings 'CHUNK:prompt' (the first may omit 'CHUNK:')."""
        entries = []
        for i, spec in enumerate(specs):
            head, sep, rest = spec.partition(":")
            if sep and head.strip().isdigit():
                entries.append((int(head), rest.strip()))
            elif i == 0:
                entries.append((0, spec.strip()))
            else:
                raise PromptScheduleError(f"prompt {spec!r} needs a start chunk, as 'CHUNK:prompt' (e.g. '4:a cat')")
        return cls(tuple(entries), blend)

    def at(self, chunk: int) -> tuple[tuple[str, str | None], float]:
        """((prompt, next prompt or None), blend weight of the next prompt) for a chunk."""
        idx = max(i for i, (s, _) in enumerate(self.entries) if s <= chunk)
        start, current = self.entries[idx]
        if idx == 0 or self.blend < 2 or chunk - start >= self.blend:
            return (current, None), 0.0
        previous = self.entries[idx - 1][1]
        return (previous, current), (chunk - start) / (self.blend - 1)

    def with_prompt_from(self, chunk: int, prompt: str) -> "PromptSchedule":
        """A copy in which `prompt` applies from `chunk` on (later entries are dropped)."""
        kept = tuple(e for e in self.entries if e[0] < chunk)
        return PromptSchedule(kept + ((chunk, prompt),), self.blend)


class LivePrompt:
    """A prompt schedule that another thread may change while a video streams (interactive steering).

    The engine reads `at(chunk)` once per chunk, so a change applies from the next chunk it starts.
    """

    def __init__(self, prompt: "str | PromptSchedule", blend: int = 0):
        import threading

        self._lock = threading.Lock()
        schedule = PromptSchedule.coerce(prompt)
        self._schedule = PromptSchedule(schedule.entries, blend or schedule.blend)
        self._next_chunk = 0

    def at(self, chunk: int) -> tuple[tuple[str, str | None], float]:
        with self._lock:
            self._next_chunk = chunk + 1
            return self._schedule.at(chunk)

    def steer(self, prompt: str) -> int:
        """Use `prompt` from the next chunk the engine starts; returns that chunk's index."""
        with self._lock:
            chunk = self._next_chunk
            self._schedule = self._schedule.with_prompt_from(chunk, prompt)
            return chunk

    @property
    def schedule(self) -> PromptSchedule:
        with self._lock:
            return self._schedule
