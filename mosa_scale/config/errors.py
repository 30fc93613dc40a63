"""One error type for every configuration problem, reporting all problems at once."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class ConfigError(ValueError):
    """A configuration is invalid.

    Attributes:
        problems: One line per problem, each naming the field, what was given and what is allowed.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        head = f"{len(self.problems)} configuration problem(s):"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class Problems:
    """Collects configuration problems so that all of them are reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(f"{field}: {message}")

    def choice(self, field: str, value: object, allowed: Iterable[object]) -> None:
        """Records a problem unless ``value`` is one of ``allowed``."""
        allowed = list(allowed)
        if value not in allowed:
            self.add(field, f"got {value!r}; allowed values are {', '.join(repr(a) for a in allowed)}")

    def unknown(self, field: str, known: Iterable[str]) -> None:
        """Records an unknown key, with a "did you mean" suggestion when one is close."""
        name = field.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys are {', '.join(sorted(known))}"
        self.add(field, f"unknown key{hint}")

    def raise_if_any(self) -> None:
        """Raises:
        ConfigError: if any problem was recorded.
        """
        if self.items:
            raise ConfigError(self.items)
