"""A shopper's seen items, as an answer needs them: which of its candidates they hold.

WHY: the gateway read the whole seen set (SMEMBERS) on every GetRecommendations and decoded
every member, so a heavy shopper's answer cost more with each item they ever touched: under
`make load` the synthetic shoppers reach thousands of items within minutes, and the gateway's
per-answer CPU grew until it could not keep up (docs/load.md). An answer only ever asks "is this
candidate seen?" for a few hundred candidates. So the user-state read returns the whole set only
while it is small (``STYLEREC_SEEN_READ_MAX`` members); a larger one is asked about the answer's
candidates, all of them in one SMISMEMBER round trip, remembered for the rest of the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class SeenItems:
    """Membership of candidates in the seen set: the whole set when it was read, else asked.

    ``size``: the set's cardinality (0: no history); ``members``: the whole set, or None when it
    was too large to read; ``ask``: asks Redis which of some ids are members (SMISMEMBER order),
    raising DependencyUnavailable like every downstream call (the caller records the
    degradation and treats the ids as unseen, as it does when the whole read fails)."""

    def __init__(
        self,
        size: int,
        members: set[str] | None,
        ask: Callable[[list[str]], list[bool]] | None = None,
        allowed: frozenset[str] = frozenset(),
    ) -> None:
        self.size = size
        self._members = members
        self._ask = ask
        self._answers: dict[str, bool] = {}
        self._allowed = allowed  # seen items the answer may show again (scoring's rebuys)

    @classmethod
    def whole(cls, members: set[str]) -> SeenItems:
        return cls(len(members), members)

    def __bool__(self) -> bool:
        """Whether the shopper has any history at all."""
        return self.size > 0

    def allowing(self, items: frozenset[str]) -> SeenItems:
        """The same set with ``items`` treated as unseen (rebuys scoring put back in the list)."""
        out = SeenItems(self.size, self._members, self._ask, self._allowed | items)
        out._answers = self._answers
        return out

    def among(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are seen (and not allowed again); at most one round trip."""
        wanted = list(dict.fromkeys(ids))
        if self._members is not None:
            hit = {i for i in wanted if i in self._members}
        else:
            new = [i for i in wanted if i not in self._answers]
            if new and self._ask is not None:
                self._answers.update(zip(new, self._ask(new), strict=True))
            hit = {i for i in wanted if self._answers.get(i, False)}
        return hit - self._allowed if self._allowed else hit
