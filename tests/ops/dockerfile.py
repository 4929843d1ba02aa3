"""A small Dockerfile and .dockerignore reader for the image tests.

There is no Docker engine on the dev and CI machines, so the tests check what
a build would need statically: instructions per stage, COPY sources against the
build context as .dockerignore filters it, and the entry point. The services
share one multi-target Dockerfile, so :func:`image` resolves a target through
the stages it is built ``FROM`` into what the image ends up with.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", text, re.S)
            if not m:
                return None
            text = m.group(1)
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Returns (global ARG defaults, stages). Continuation lines are joined; comments dropped."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = parts[0]
            for k, v in args.items():
                base = base.replace("${" + k + "}", v).replace("$" + k, v)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=base, name=name))
            continue
        if not stages:
            if keyword == "ARG":
                k, _, v = rest.partition("=")
                args[k] = v.strip('"')
            continue
        stages[-1].instructions.append(Instruction(keyword, rest, n))
    return args, stages


def image(stages: list[Stage], target: str) -> Stage:
    """What ``docker build --target TARGET`` produces: the instructions of every stage in its
    ``FROM`` chain, oldest first, and the external image at the root of that chain as ``base``."""
    by_name = {s.name: s for s in stages}
    if target not in by_name:
        raise KeyError(f"no stage named {target!r} (stages: {', '.join(by_name)})")
    chain: list[Stage] = []
    stage = by_name[target]
    while True:
        chain.append(stage)
        if stage.base not in by_name or len(chain) > len(stages):
            break
        stage = by_name[stage.base]
    merged = Stage(base=chain[-1].base, name=target)
    for st in reversed(chain):
        merged.instructions.extend(st.instructions)
    return merged


def stage_arg(stage: Stage, name: str) -> str:
    for ins in stage.all("ARG"):
        k, _, v = ins.args.partition("=")
        if k == name:
            return str(shlex.split(v)[0]) if v else ""
    raise KeyError(name)


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of a COPY/ADD instruction in shell form."""
    parts = shlex.split(ins.args)
    flags = {}
    while parts and parts[0].startswith("--"):
        k, _, v = parts.pop(0)[2:].partition("=")
        flags[k] = v
    return parts[:-1], parts[-1], flags


class DockerIgnore:
    """Docker's .dockerignore semantics: patterns in order, the last match wins,
    ``!`` re-includes, and a pattern that matches a directory excludes what is in it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = pattern.strip("/")
            self.rules.append((negate, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
                continue
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
                continue
            out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
            i += 1
        return "^" + out + "$"

    def excluded(self, rel_path: str) -> bool:
        parts = rel_path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                result = not negate
        return result
