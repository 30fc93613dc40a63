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
    """Collects configuration problems so that all of them are reported in one error.

    Every config section checks itself this way: its ``validate_into(p, prefix=...)`` records each
    problem as ``section.field: what was given; what is allowed``, and its ``__post_init__`` raises
    them all at once (:meth:`raise_if_any`), so a bad section cannot be built, from YAML or in code.
    """

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        """Records ``field: message``; ``field`` is the dotted key (``optim.lr``)."""
        self.items.append(f"{field}: {message}")

    def positive(self, field: str, value: object) -> None:
        """Records a problem unless ``value`` is a number > 0."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.add(field, f"got {value!r}; must be > 0")

    def choice(self, field: str, value: object, allowed: Iterable[object]) -> None:
        """Records a problem unless ``value`` is one of ``allowed``."""
        allowed = list(allowed)
        if value not in allowed:
            self.add(field, f"got {value!r}; allowed values are {allowed!r}")

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
