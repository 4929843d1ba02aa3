"""Retraining triggers: after N new events and on a schedule (fresh models reset the timer)."""

from __future__ import annotations

import time

from services.scoring.config import ScoringSettings
from services.scoring.trainer import TrainScheduler


class FakeTrainer:
    """Stands in for Trainer (a collaborator): records what the scheduler asked for."""

    busy = False

    def __init__(self) -> None:
        self.triggers: list[str] = []

    def train_in_background(self, algorithm: str = "", trigger: str = "rpc") -> bool:
        self.triggers.append(trigger)
        return True


def wait(cond, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_retrains_after_n_new_events() -> None:
    seen = {"n": 0}
    trainer = FakeTrainer()
    sched = TrainScheduler(ScoringSettings(train_after_events=3), trainer, lambda: seen["n"])  # type: ignore[arg-type]
    sched.start()
    try:
        seen["n"] = 2
        time.sleep(1.3)
        assert trainer.triggers == []
        seen["n"] = 5
        assert wait(lambda: trainer.triggers == ["events"])
    finally:
        sched.stop()


def test_schedule_skips_while_a_fresh_model_serves() -> None:
    trainer = FakeTrainer()
    age = {"s": 0.0}
    settings = ScoringSettings(train_interval_s=1.0)
    sched = TrainScheduler(settings, trainer, lambda: 0, lambda: age["s"])  # type: ignore[arg-type]
    sched.start()
    try:
        time.sleep(2.3)
        assert trainer.triggers == []  # another replica just published: nothing to do
        age["s"] = 10.0
        assert wait(lambda: "schedule" in trainer.triggers)
    finally:
        sched.stop()
