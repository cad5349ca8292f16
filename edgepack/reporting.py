"""How a stage tells whoever runs it what it is doing, without printing anything itself."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def start(self, stage: str, text: str) -> None:
        """A stage begins."""

    def step(self, stage: str, text: str) -> None:
        """One piece of a long stage is done: a variant made, a timing round finished."""

    def finish(self, stage: str, text: str) -> None:
        """A stage ends, with its result in one line."""


class SilentReporter:
    def start(self, stage: str, text: str) -> None:
        pass

    def step(self, stage: str, text: str) -> None:
        pass

    def finish(self, stage: str, text: str) -> None:
        pass
