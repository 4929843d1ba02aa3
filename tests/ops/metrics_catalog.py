"""The metrics our code declares, read the same way the docs generator reads them."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


@cache
def gen_docs() -> ModuleType:
    """scripts/gen_config_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def declared_metrics() -> dict[str, object]:
    """Exposed series name (histograms: also _bucket/_count/_sum) -> MetricDoc."""
    out: dict[str, object] = {}
    for doc in gen_docs().declared_metrics().values():
        for name in doc.series_names:
            out[name] = doc
    return out
