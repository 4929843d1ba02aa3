"""`stylerec bench <area>`: benchmark commands shared by several areas.

Each area registers its own sub-command from its own module, so adding one is a
one-line change here: append the module to ``BENCH_MODULES``. A module exposes
``register_bench(bench_subparsers)`` and writes its JSON under ``out/bench/``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Modules contributing `stylerec bench` sub-commands; each exposes register_bench(subparsers).
BENCH_MODULES = [
    "cli.bench.ingest",
    "cli.bench.style",
    "cli.bench.gateway",
    "cli.bench.scoring",
    "cli.load.commands",
    "cli.bench.summary",
]


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register_bench(bsub)
