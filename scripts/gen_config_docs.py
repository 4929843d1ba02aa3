#!/usr/bin/env python
"""Generate the configuration reference and the metrics catalog from the code.

    .venv/bin/python scripts/gen_config_docs.py          # rewrite docs/configuration.md and docs/metrics.md
    .venv/bin/python scripts/gen_config_docs.py --check  # exit 1 if either is stale (tests run this)

Why generated: the env vars are the fields of each service's pydantic settings
class and the metrics are the objects its metrics modules declare. A hand-written
table would drift the first time someone adds a field or a metric; this one is
rebuilt from the classes themselves, and a test fails when the committed copy is stale.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "gen"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pydantic.fields import FieldInfo  # noqa: E402

from libs.common.settings import ServiceSettings  # noqa: E402

CONFIG_DOC = REPO / "docs" / "configuration.md"
METRICS_DOC = REPO / "docs" / "metrics.md"
CATALOG_BEGIN = "<!-- BEGIN GENERATED CATALOG (scripts/gen_config_docs.py) -->"
CATALOG_END = "<!-- END GENERATED CATALOG -->"

# service display name -> (module, settings class, how it is started)
SERVICES: dict[str, tuple[str, str, str]] = {
    "ingestion": ("services.ingestion.config", "IngestionSettings", "python -m services.ingestion"),
    "scoring": ("services.scoring.config", "ScoringSettings", "python -m services.scoring"),
    "style-worker": ("services.style_worker.config", "StyleWorkerSettings", "python -m services.style_worker"),
    "gateway": ("services.gateway.config", "GatewaySettings", "python -m services.gateway"),
}
METRIC_MODULES = {
    "libs.common.metrics": "all services",
    "services.ingestion.metrics": "ingestion",
    "services.scoring.metrics": "scoring",
    "services.style_worker.metrics": "style-worker",
    "services.gateway.metrics": "gateway",
}


# ---------------------------------------------------------------- configuration


def settings_classes() -> dict[str, type[ServiceSettings]]:
    out = {}
    for name, (module, cls, _cmd) in SERVICES.items():
        out[name] = getattr(importlib.import_module(module), cls)
    return out


def env_name(cls: type[ServiceSettings], field: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return (prefix + field).upper()


def type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_text(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


CONSTRAINT_SYMBOLS = (
    ("ge", "≥"),
    ("gt", ">"),
    ("le", "≤"),
    ("lt", "<"),
    ("min_length", "len ≥"),
    ("max_length", "len ≤"),
)


def constraints(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in CONSTRAINT_SYMBOLS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    elif info.is_required():
        return "**required**"
    else:
        value = info.default
    if value == "":
        return '`""` (empty)'
    return f"`{value}`"


def describe(info: FieldInfo) -> str:
    text = (info.description or "").replace("|", "\\|").replace("\n", " ").strip()
    extra = constraints(info)
    return f"{text} ({extra})" if extra else text


@dataclass
class Row:
    env: str
    type: str
    default: str
    meaning: str


def rows_for(cls: type[ServiceSettings], fields: list[str]) -> list[Row]:
    out = []
    for name in fields:
        info = cls.model_fields[name]
        meaning = describe(info)
        if not meaning and name in ServiceSettings.model_fields:
            # An override without its own description keeps the shared field's meaning.
            meaning = describe(ServiceSettings.model_fields[name])
        out.append(Row(env_name(cls, name), type_text(info.annotation), default_text(info), meaning))
    return out


def table(rows: list[Row]) -> list[str]:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{r.env}` | {r.type} | {r.default} | {r.meaning} |" for r in rows]
    return lines


def render_configuration() -> str:
    classes = settings_classes()
    base_fields = list(ServiceSettings.model_fields)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from the settings classes; do not edit by hand. -->",
        "",
        "Every service is configured only through environment variables, read and validated at start-up by",
        "its one pydantic settings class (a bad value stops the process with a message naming the variable).",
        "All variables have the `STYLEREC_` prefix. In docker-compose they are set in `docker-compose.yml`;",
        "in Kubernetes they come from the `stylerec-config` ConfigMap, the `stylerec-secrets` Secret and the",
        "per-Deployment `env` (see docs/deploy.md).",
        "",
        "## Shared by all services",
        "",
        f"Defined in `libs/common/settings.py` (`{ServiceSettings.__name__}`). Where a service overrides a",
        "default, its own table below says so.",
        "",
    ]
    lines += table(rows_for(ServiceSettings, base_fields))
    for svc, cls in classes.items():
        module, cls_name, cmd = SERVICES[svc]
        own = [f for f in cls.model_fields if f not in ServiceSettings.model_fields]
        overridden = [
            f
            for f in base_fields
            if f in cls.model_fields
            and default_text(cls.model_fields[f]) != default_text(ServiceSettings.model_fields[f])
        ]
        lines += [
            "",
            f"## {svc}",
            "",
            f"`{cmd}` — settings class `{cls_name}` in `{module.replace('.', '/')}.py`.",
            "",
        ]
        if overridden:
            lines += ["Shared variables with a different default here:", ""]
            lines += table(rows_for(cls, overridden))
            lines.append("")
        if own:
            lines += ["Variables of this service only:", ""]
            lines += table(rows_for(cls, own))
        else:
            lines.append("No variables of its own.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- metrics


@dataclass
class MetricDoc:
    name: str  # as exposed (counters with _total)
    type: str
    labels: tuple[str, ...]
    help: str
    owner: str
    module: str
    buckets: tuple[float, ...] = ()

    @property
    def series_names(self) -> set[str]:
        if self.type == "histogram":
            return {self.name, f"{self.name}_bucket", f"{self.name}_count", f"{self.name}_sum"}
        if self.type == "summary":
            return {self.name, f"{self.name}_count", f"{self.name}_sum"}
        return {self.name}


def declared_metrics() -> dict[str, MetricDoc]:
    """Every metric object in our metrics modules, keyed by exposed name (missing modules are skipped:
    a service without its own metrics.py yet simply has none)."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, MetricDoc] = {}
    for module_name, owner in METRIC_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        for obj in vars(module).values():
            if not isinstance(obj, MetricWrapperBase):
                continue
            kind = str(obj._type)
            name = obj._name + ("_total" if kind == "counter" else "")
            doc = MetricDoc(
                name=name,
                type=kind,
                labels=tuple(obj._labelnames),
                help=obj._documentation,
                owner=owner,
                module=module_name,
                buckets=tuple(getattr(obj, "_upper_bounds", ())),
            )
            out[name] = doc
    return out


def unit_of(name: str) -> str:
    for suffix, unit in (("_seconds", "seconds"), ("_bytes", "bytes"), ("_messages", "messages"), ("_ratio", "ratio")):
        if name.removesuffix("_total").endswith(suffix):
            return unit
    return ""


def render_catalog() -> str:
    metrics = declared_metrics()
    lines = [CATALOG_BEGIN, ""]
    for module_name, owner in METRIC_MODULES.items():
        mine = [m for m in metrics.values() if m.module == module_name]
        if not mine:
            continue
        lines += [f"### {owner} (`{module_name.replace('.', '/')}.py`)", ""]
        lines += ["| metric | type | labels | meaning |", "|---|---|---|---|"]
        for m in sorted(mine, key=lambda m: m.name):
            labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
            meaning = m.help.replace("|", "\\|")
            unit = unit_of(m.name)
            if unit and unit not in meaning:
                meaning += f" Unit: {unit}."
            lines.append(f"| `{m.name}` | {m.type} | {labels} | {meaning} |")
        lines.append("")
    lines.append(CATALOG_END)
    return "\n".join(lines)


def render_metrics_doc(current: str) -> str:
    """Replace the generated block of docs/metrics.md, keeping the hand-written text around it."""
    catalog = render_catalog()
    if CATALOG_BEGIN in current and CATALOG_END in current:
        head, _, rest = current.partition(CATALOG_BEGIN)
        _, _, tail = rest.partition(CATALOG_END)
        return head + catalog + tail
    return current.rstrip("\n") + "\n\n## Catalog\n\n" + catalog + "\n"


# ---------------------------------------------------------------- main


def outputs() -> dict[Path, str]:
    current_metrics = METRICS_DOC.read_text() if METRICS_DOC.exists() else "# Metrics\n"
    return {CONFIG_DOC: render_configuration(), METRICS_DOC: render_metrics_doc(current_metrics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/configuration.md and the docs/metrics.md catalog.")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a committed doc is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        if args.check:
            stale.append(path)
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1)
            print("\n".join(list(diff)[:60]), file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        names = ", ".join(str(p.relative_to(REPO)) for p in stale)
        print(f"stale: {names}; run: .venv/bin/python scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
