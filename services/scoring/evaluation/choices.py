"""What `stylerec eval` may be asked for, in a module with no heavy imports: the CLI builds its
parser from these without importing the harness (which pulls in torch and implicit)."""

from __future__ import annotations

DEFAULT_ALGORITHMS = (
    "popularity",
    "itemknn",
    "als",
    "bpr",
    "ease",
    "history",
    "itemknn+history",
    "als+history",
    "bpr+history",
    "ease+history",
)
TARGETS = ("new", "all", "repeat")
