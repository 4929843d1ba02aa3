"""The environment of the scoring benchmarks' private stacks (bench/scoring.py and bench/scoring_apply.py)."""

from __future__ import annotations

from libs.common.settings import DEV_PSEUDONYM_SECRET


def scoring_bench_env(train_on_start: bool, max_poll_interval_ms: int) -> dict[str, str]:
    """Environment of the scoring benchmarks' private stacks: the dev pseudonym secret (the bench
    pseudonymizes users itself), short group timeouts so a rebalance cannot eat the run, and
    warnings-only logs so logging is not what is measured."""
    return {
        "STYLEREC_PSEUDONYM_SECRET": DEV_PSEUDONYM_SECRET,
        "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STYLEREC_KAFKA_MAX_POLL_INTERVAL_MS": str(max_poll_interval_ms),
        "STYLEREC_TRAIN_ON_START": "true" if train_on_start else "false",
        "STYLEREC_LOG_LEVEL": "WARNING",
    }
