"""Helpers the benchmarks and the load test share: who else is using the machine, what the machine is,
percentiles, and the resident memory of a process group.

The dev box is a shared 2-core machine, so a number without "what else was running" is not
honest; these helpers make that context cheap to record in every JSON a benchmark writes.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli.localstack.stack import REPO

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A process counts as "busy" when it used at least this share of one core over a sample.
BUSY_CPU_SHARE = 0.05


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def git_commit() -> str:
    """HEAD of the repository; the tree is shared and usually dirty, so this is the base commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(note: str = "") -> dict[str, object]:
    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if note:
        info["note"] = note
    return info


def pct_ms(sorted_s: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of sorted seconds, in milliseconds; 0.0 when empty."""
    if not sorted_s:
        return 0.0
    idx = min(len(sorted_s) - 1, max(0, math.ceil(p / 100 * len(sorted_s)) - 1))
    return round(sorted_s[idx] * 1000, 3)


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(process group, utime+stime ticks) of one /proc entry, None when it vanished."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[2]), int(rest[11]) + int(rest[12])


def snapshot() -> dict[int, tuple[int, int]]:
    """pid -> (process group, CPU ticks) for every process on the machine, read once."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(entry)
            if st is not None:
                out[int(entry)] = st
    return out


def rss_by_group(pgids: Iterable[int], snap: dict[int, tuple[int, int]] | None = None) -> dict[int, float]:
    """Summed VmRSS (MiB) of every process in each process group: a service plus any child it forked."""
    wanted = set(pgids)
    total_kb = dict.fromkeys(wanted, 0)
    for pid, (group, _ticks) in (snap if snap is not None else snapshot()).items():
        if group not in wanted:
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb[group] += int(line.split()[1])
                    break
        except OSError:
            continue
    return {g: round(kb / 1024, 1) for g, kb in total_kb.items()}


@dataclass
class OtherLoad:
    """CPU used by processes outside ``own_groups`` between successive :meth:`sample` calls.

    Own groups are this command's process group and the stack's components (each runs in its
    own session); everything else on the box is "other" — the helpers sharing the machine.
    """

    own_groups: set[int] = field(default_factory=set)
    _last: dict[int, tuple[int, int]] = field(default_factory=dict)
    _last_t: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)

    def own(self, groups: Iterable[int]) -> None:
        self.own_groups.update(groups)

    def sample(self, snap: dict[int, tuple[int, int]] | None = None) -> dict[str, float] | None:
        now = time.monotonic()
        snap = snap if snap is not None else snapshot()
        result = None
        if self._last:
            dt = max(1e-6, now - self._last_t)
            busy = 0
            ticks = 0
            for pid, (group, t) in snap.items():
                if group in self.own_groups or pid not in self._last:
                    continue
                d = t - self._last[pid][1]
                ticks += max(0, d)
                if d / CLK_TCK / dt >= BUSY_CPU_SHARE:
                    busy += 1
            result = {"busy_processes": float(busy), "cores_used": round(ticks / CLK_TCK / dt, 3)}
            self.samples.append(result)
        self._last, self._last_t = snap, now
        return result

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"samples": 0}
        return {
            "samples": len(self.samples),
            "mean_cores_used_by_other_processes": round(
                sum(s["cores_used"] for s in self.samples) / len(self.samples), 3
            ),
            "max_busy_other_processes": max(s["busy_processes"] for s in self.samples),
            "mean_busy_other_processes": round(sum(s["busy_processes"] for s in self.samples) / len(self.samples), 2),
        }
