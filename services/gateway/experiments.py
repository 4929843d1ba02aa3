"""Deterministic experiment arms: which arm a user is in, from a keyed hash of the pseudonym.

Why a keyed hash and not a random draw or a stored assignment: every gateway replica must put
the same user in the same arm, on every request, without a shared store on the hot path, and
nobody without the salt may predict or steer it. HMAC-SHA256(salt, experiment | pseudonym) is
stable across replicas and restarts, costs ~2 µs, and a new salt (or experiment name) draws a
fresh, independent split. The raw shop id never enters: only the pseudonym the gateway already
computed.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from services.gateway.config import ExperimentArm, GatewaySettings

__all__ = ["NO_EXPERIMENT", "Assignment", "ExperimentArm", "Experiments"]


@dataclass(frozen=True)
class Assignment:
    """The experiment and arm of one answer; ``arm`` None when no experiment runs."""

    experiment: str
    arm: ExperimentArm | None

    @property
    def arm_name(self) -> str:
        return self.arm.name if self.arm is not None else ""


NO_EXPERIMENT = Assignment("", None)


class Experiments:
    """Maps a pseudonym to its arm by weight; with no arms configured everyone gets NO_EXPERIMENT."""

    def __init__(self, name: str, salt: str, arms: tuple[ExperimentArm, ...]) -> None:
        self.name = name
        self.arms = arms
        self._key = (salt or name).encode()
        self._total = sum(a.weight for a in arms)
        # Cumulative weights: bucket b falls into the first arm whose bound exceeds it.
        bounds: list[int] = []
        acc = 0
        for arm in arms:
            acc += arm.weight
            bounds.append(acc)
        self._bounds = bounds
        self._assignments = tuple(Assignment(name, a) for a in arms)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Experiments:
        return cls(settings.experiment_name, settings.experiment_salt, settings.experiment_arms)

    @property
    def active(self) -> bool:
        return bool(self.arms)

    def bucket(self, pseudonym: str) -> int:
        digest = hmac.new(self._key, f"{self.name}|{pseudonym}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") % self._total

    def assign(self, pseudonym: str) -> Assignment:
        if not self.arms:
            return NO_EXPERIMENT
        b = self.bucket(pseudonym)
        for n, bound in enumerate(self._bounds):
            if b < bound:
                return self._assignments[n]
        return self._assignments[-1]  # unreachable: b < total == last bound
