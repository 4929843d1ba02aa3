"""Reading event files (CSV or JSONL) and running bulk sends for `stylerec ingest`.

A bulk file is judged row by row: a row that cannot be read (no user, an
unknown type, a timestamp that is neither unix seconds nor ISO-8601) becomes a
*reject* with its line number, the raw row and the reason, and every other row
is still sent. Only a file that cannot be used at all raises
:class:`EventFileError` (missing, not text, no usable header, not one readable
row), which the CLI turns into exit code 2.

The second half, :func:`run_bulk`, is shared by ``ingest events`` and ``ingest
items``: it batches the readable rows, sends each batch, maps the server's
per-row rejections back to line numbers, retries what the server says is
retryable, shows a progress bar, streams the rejects to ``--rejects`` and, when
interrupted, says exactly which lines were acknowledged.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from stylerec.v1 import common_pb2

REQUIRED = ("user_id", "item_id", "type", "timestamp")
OPTIONAL = ("event_id", "value")
# google.protobuf.Timestamp's range: 0001-01-01 .. 9999-12-31.
MIN_TS, MAX_TS = -62135596800.0, 253402300799.0
# How many rejects are kept in memory for the summary (all of them go to --rejects).
KEEP_REJECTS = 100
T = TypeVar("T")


class EventFileError(ValueError):
    """The file as a whole cannot be used (exit 2); row problems are rejects instead."""


# ---------------------------------------------------------------- parsing


def parse_timestamp(value: Any) -> float:
    """Unix seconds (int/float/str) or ISO-8601; naive times are UTC.

    Out-of-range and non-finite values are refused here, because protobuf's
    Timestamp would otherwise fail with an OverflowError nobody can act on.
    """
    if isinstance(value, bool):
        raise ValueError(f"timestamp {value!r} is neither unix seconds nor ISO-8601")
    if isinstance(value, int | float):
        ts = float(value)
    else:
        text = str(value).strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError(f"timestamp {text!r} is neither unix seconds nor ISO-8601") from exc
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            ts = dt.timestamp()
    if not math.isfinite(ts) or not MIN_TS <= ts <= MAX_TS:
        raise ValueError(f"timestamp {value!r} is outside the years 1-9999")
    return ts


def to_event(row: dict[str, Any]) -> common_pb2.Event:
    """One event from a CSV/JSONL row; ValueError names the field that is wrong."""
    missing = [c for c in REQUIRED if row.get(c) is None or str(row.get(c)).strip() == ""]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    type_name = str(row["type"]).strip().upper()
    if type_name not in common_pb2.EventType.keys() or type_name == "EVENT_TYPE_UNSPECIFIED":  # noqa: SIM118
        raise ValueError(f"unknown type {row['type']!r} (VIEW, CLICK, FAVORITE, ADD_TO_CART, PURCHASE)")
    ts = parse_timestamp(row["timestamp"])
    event = common_pb2.Event(
        user_id=str(row["user_id"]).strip(),
        item_id=str(row["item_id"]).strip(),
        type=common_pb2.EventType.Value(type_name),
        event_id=str(row.get("event_id") or "").strip(),
    )
    event.timestamp.FromNanoseconds(int(ts * 1e9))
    value = row.get("value")
    if value is not None and str(value).strip() != "":
        if isinstance(value, bool):
            raise ValueError(f"value {value!r} is not a number")
        try:
            event.value = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"value {value!r} is not a number") from exc
    return event


@dataclass
class Row(Generic[T]):
    """One data row of a bulk file: its first physical line, the raw text, and a value or an error."""

    line: int
    raw: str
    value: T | None = None
    error: str | None = None
    index: int = 0  # 0-based position among the file's data rows


class _Lines:
    """Iterates a binary file as text lines, remembering the lines of the current record.

    csv.reader pulls exactly the physical lines of one record (several for a
    quoted newline), so after each record ``taken`` holds its raw text. Lines
    that are not UTF-8 are decoded with replacement and flagged, so one bad
    byte rejects one row instead of ending the run.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.line = 0
        self.taken: list[str] = []
        self.bad_utf8 = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        data = self.f.readline()
        if not data:
            raise StopIteration
        self.line += 1
        if self.line == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            self.bad_utf8 = True
        self.taken.append(text)
        return text

    def record(self) -> str:
        raw = "".join(self.taken).rstrip("\r\n")
        self.taken = []
        return raw


def sniff(path: Path) -> str:
    """``"jsonl"`` or ``"csv"`` from the first non-blank line; EventFileError for anything else."""
    if not path.exists():
        raise EventFileError(f"{path}: no such file")
    if not path.is_file():
        raise EventFileError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    if b"\x00" in head:
        raise EventFileError(f"{path}: not a text file (expected CSV with a header line, or JSONL)")
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not first:
        raise EventFileError(f"{path}: the file is empty (expected CSV with a header line, or JSONL)")
    if first.startswith("{"):
        return "jsonl"
    if first.startswith("["):
        raise EventFileError(f"{path}: expected a JSON object per line (JSONL); a JSON array is not supported")
    return "csv"


def read_event_rows(path: Path) -> Iterator[Row[common_pb2.Event]]:
    """Every data row of a CSV/JSONL event file, readable or not, with its line number.

    Raises EventFileError before the first row when the file itself is unusable.
    """
    fmt = sniff(path)
    if fmt == "jsonl":
        yield from jsonl_rows(path, to_event)
    else:
        yield from _csv_event_rows(path)


def jsonl_rows(path: Path, convert: Callable[[dict[str, Any]], T]) -> Iterator[Row[T]]:
    with open(path, "rb") as f:
        lines = _Lines(f)
        index = -1
        for text in lines:
            raw = lines.record()
            if not text.strip():
                continue
            index += 1
            row: Row[T] = Row(line=lines.line, raw=raw, index=index)
            if lines.bad_utf8:
                lines.bad_utf8 = False
                row.error = "not valid UTF-8"
                yield row
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                row.error = f"not valid JSON ({exc.msg})"
                yield row
                continue
            if not isinstance(obj, dict):
                row.error = "expected a JSON object"
                yield row
                continue
            try:
                row.value = convert(obj)
            except (ValueError, TypeError) as exc:
                row.error = str(exc)
            except OSError as exc:  # a photo that exists but cannot be read
                row.error = f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}"
            yield row


def _csv_event_rows(path: Path) -> Iterator[Row[common_pb2.Event]]:
    with open(path, "rb") as f:
        lines = _Lines(f)
        reader = csv.reader(lines)
        try:
            header = [h.strip() for h in next(reader)]
        except (StopIteration, csv.Error) as exc:
            raise EventFileError(f"{path}:1: no CSV header line ({exc})") from exc
        lines.record()
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise EventFileError(
                f"{path}:1: CSV header lacks {', '.join(missing)} (need {','.join(REQUIRED)}[,event_id,value])"
            )
        unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
        if unknown:
            print(f"stylerec: {path}: ignoring column(s) {', '.join(unknown)}", file=sys.stderr)
        index = -1
        while True:
            start = lines.line + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                index += 1
                yield Row(line=start, raw=lines.record(), error=f"not valid CSV ({exc})", index=index)
                continue
            raw = lines.record()
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            index += 1
            row: Row[common_pb2.Event] = Row(line=start, raw=raw, index=index)
            if lines.bad_utf8:
                lines.bad_utf8 = False
                row.error = "not valid UTF-8"
            elif len(fields) > len(header):
                row.error = f"{len(fields)} fields, the header has {len(header)}"
            else:
                try:
                    row.value = to_event(dict(zip(header, fields, strict=False)))
                except (ValueError, TypeError) as exc:
                    row.error = str(exc)
            yield row


def read_events(path: Path) -> Iterator[common_pb2.Event]:
    """All-or-nothing reading: EventFileError ``path:line: reason`` at the first bad row.

    For callers (and tests) that want a clean file or nothing; the CLI uses
    :func:`read_event_rows` and keeps going.
    """
    for row in read_event_rows(path):
        if row.error is not None or row.value is None:
            raise EventFileError(f"{path}:{row.line}: {row.error}")
        yield row.value


def count_lines(path: Path) -> int:
    """Physical lines, for the progress bar's total (one fast pass over the bytes)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# ---------------------------------------------------------------- rejects


@dataclass(frozen=True)
class Reject:
    """A row that was not stored.

    ``source``: ``file`` (could not be read), ``check`` (``--strict``'s
    client-side limits) or ``server`` (the ingestion service refused it).
    """

    line: int
    source: str
    reason: str
    raw: str
    index: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "index": self.index, "source": self.source, "reason": self.reason, "raw": self.raw}


class RejectsWriter:
    """Streams rejects to ``--rejects FILE`` (CSV or JSONL by suffix), flushed per batch.

    Streaming (not writing at the end) is what keeps the list complete when a
    run is interrupted or the service fails half-way.
    """

    COLUMNS = ("line", "source", "reason", "raw")

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f: IO[str] | None = None
        self._csv: Any = None
        if path is None:
            return
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise EventFileError(f"--rejects {path}: name it .csv or .jsonl (that picks the format)")
        if not path.parent.is_dir():
            raise EventFileError(f"--rejects {path}: folder {path.parent} does not exist")
        self._f = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if suffix == ".csv":
            self._csv = csv.writer(self._f)
            self._csv.writerow(self.COLUMNS)

    def write(self, rejects: Iterable[Reject]) -> None:
        if self._f is None:
            return
        for r in rejects:
            if self._csv is not None:
                self._csv.writerow([r.line, r.source, r.reason, r.raw])
            else:
                self._f.write(json.dumps(r.as_dict()) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------- sending


@dataclass
class Outcome:
    """The server's answer for one batch: counts and per-row reasons by index into the batch."""

    accepted: int
    duplicates: int = 0
    rejected: dict[int, str] = field(default_factory=dict)


class SendFailed(Exception):
    """A batch could not be delivered.

    ``retry_after_s`` set = the server asked to try again (UNAVAILABLE,
    RESOURCE_EXHAUSTED); ``caller_error`` = the request is wrong (credentials,
    permissions), which no retry fixes.
    """

    def __init__(self, message: str, retry_after_s: float | None = None, caller_error: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.caller_error = caller_error


@dataclass
class BulkReport:
    """What a bulk run did; every number is counted from the server's answers, not assumed."""

    noun: str
    accepted_word: str = "accepted"
    rows: int = 0
    sent: int = 0
    acknowledged: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected_file: int = 0
    rejected_server: int = 0
    last_line_acknowledged: int = 0
    in_flight_lines: tuple[int, int] | None = None
    stopped: str | None = None
    caller_error: bool = False
    interrupted: bool = False
    strict_refused: bool = False
    first_rejects: list[Reject] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.rejected_file + self.rejected_server

    def exit_code(self) -> int:
        """0 all stored, 1 some rows rejected or the run stopped early, 2 a caller error, 130 Ctrl-C."""
        if self.interrupted:
            return 130
        if self.caller_error:
            return 2
        return 1 if self.rejected or self.stopped else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            self.accepted_word: self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "rejected_unreadable": self.rejected_file,
            "rejected_by_server": self.rejected_server,
            "last_line_acknowledged": self.last_line_acknowledged,
            "in_flight_lines": list(self.in_flight_lines) if self.in_flight_lines else None,
            "stopped": self.stopped,
            "interrupted": self.interrupted,
            "strict_refused": self.strict_refused,
            "first_rejects": [r.as_dict() for r in self.first_rejects],
        }

    def _keep(self, rejects: list[Reject]) -> None:
        room = KEEP_REJECTS - len(self.first_rejects)
        if room > 0:
            self.first_rejects.extend(rejects[:room])

    def print(self, path: Path, rejects_path: Path | None, show: int = 10) -> None:
        """The human summary: totals first, then the first rejects with their line numbers."""
        if self.strict_refused:
            print(f"--strict: {self.rejected} of {self.rows} rows are bad; nothing was sent")
        else:
            print(
                f"{self.noun}: {self.accepted_word} {self.accepted}  duplicates {self.duplicates}  "
                f"rejected {self.rejected} ({self.rejected_file} unreadable, {self.rejected_server} refused by "
                f"the server)  of {self.rows} rows read"
            )
        for r in self.first_rejects[:show]:
            raw = r.raw if len(r.raw) <= 80 else r.raw[:77] + "..."
            print(f"  {path}:{r.line}: {r.reason}    {raw}")
        if self.rejected > show:
            more = f"all {self.rejected} in {rejects_path}" if rejects_path else "write them all with --rejects FILE"
            print(f"  ... {self.rejected - show} more ({more})")
        elif rejects_path and self.rejected:
            print(f"  rejects written to {rejects_path}")
        if self.stopped:
            print(f"stopped: {self.stopped}")
            print(
                f"  sent {self.sent} rows, {self.acknowledged} acknowledged, every line through "
                f"{self.last_line_acknowledged} is settled"
            )
            if self.in_flight_lines:
                a, b = self.in_flight_lines
                print(
                    f"  lines {a}-{b} were in flight: they may or may not be stored; sending the file again is "
                    f"safe (stored rows come back as duplicates), or resume with --from-line {a}"
                )
            elif self.last_line_acknowledged:
                print(f"  resume with --from-line {self.last_line_acknowledged + 1}")


def batches(
    rows: Iterable[Row[T]], max_rows: int, max_bytes: int | None = None, size: Callable[[T], int] | None = None
) -> Iterator[tuple[list[Row[T]], list[Row[T]]]]:
    """(readable rows, unreadable rows) per batch, in file order.

    A batch closes at ``max_rows`` readable rows or before ``max_bytes``; the
    unreadable rows seen while filling it travel with it, so rejects are
    reported in line order.
    """
    good: list[Row[T]] = []
    bad: list[Row[T]] = []
    used = 0
    for row in rows:
        if row.error is not None or row.value is None:
            bad.append(row)
            if len(bad) >= max_rows:  # a long unreadable stretch: report it without holding it all
                yield good, bad
                good, bad, used = [], [], 0
            continue
        n = size(row.value) if size is not None else 0
        if good and (len(good) >= max_rows or (max_bytes is not None and used + n > max_bytes)):
            yield good, bad
            good, bad, used = [], [], 0
        good.append(row)
        used += n
    if good or bad:
        yield good, bad


RETRIES = 6
MAX_RETRY_WAIT_S = 10.0


def _send_with_retries(send: Callable[[list[T]], Outcome], values: list[T], sleep: Callable[[float], None]) -> Outcome:
    """Retries what the server marked retryable (its RetryInfo delay, doubled each time, capped)."""
    wait = 0.5
    for attempt in range(RETRIES):
        try:
            return send(values)
        except SendFailed as exc:
            if exc.retry_after_s is None or attempt == RETRIES - 1:
                raise
            wait = min(MAX_RETRY_WAIT_S, max(exc.retry_after_s, wait * 2))
            sleep(wait)
    raise AssertionError("unreachable")


def run_bulk(
    rows: Iterable[Row[T]],
    send: Callable[[list[T]], Outcome],
    report: BulkReport,
    *,
    max_rows: int,
    max_bytes: int | None = None,
    size: Callable[[T], int] | None = None,
    rejects: RejectsWriter | None = None,
    total_lines: int | None = None,
    from_line: int = 1,
    max_rate: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> BulkReport:
    """Send every readable row in batches; fill ``report`` as the server answers.

    Ctrl-C and a failing service end the run with ``report.stopped`` saying how
    far it got; everything acknowledged before that is stored, and the batch
    in flight is named so the caller can resume or resend.

    ``max_rate`` (rows per second) paces the batches so that a backfill leaves
    the live shop room: each batch is due ``len(batch) / max_rate`` after the
    previous one was due or went out, whichever is later. A slow answer (a
    retried batch, a busy service) therefore never earns a catch-up burst;
    counting from the first send would fire every overdue batch at once, just
    when the service is struggling.
    """
    from tqdm import tqdm

    writer = rejects or RejectsWriter(None)
    bar = tqdm(total=total_lines, desc=f"ingest {report.noun}", unit="line", file=sys.stderr, leave=False)
    done_line = from_line - 1

    def advance(to_line: int) -> None:
        nonlocal done_line
        if to_line > done_line:
            bar.update(to_line - done_line)
            done_line = to_line

    def skipped() -> Iterator[Row[T]]:
        for row in rows:
            if row.line >= from_line:
                report.rows += 1
                yield row

    pending: list[Reject] = []  # unreadable rows of the batch being sent, recorded whatever happens
    due: float | None = None  # when the next batch may go out under max_rate
    try:
        for good, bad in batches(skipped(), max_rows, max_bytes, size):
            pending = [Reject(r.line, "file", r.error or "unreadable", r.raw, r.index) for r in bad]
            server_rejects: list[Reject] = []
            if good and max_rate is not None:
                now = clock()
                if due is not None and due > now:
                    sleep(due - now)
                due = max(due or now, now) + len(good) / max_rate
            if good:
                report.in_flight_lines = (good[0].line, good[-1].line)
                report.sent += len(good)
                try:
                    outcome = _send_with_retries(send, [r.value for r in good if r.value is not None], sleep)
                except SendFailed as exc:
                    # Every attempt failed with an error answer: the server did not take this batch.
                    report.stopped = str(exc)
                    report.caller_error = exc.caller_error
                    report.sent -= len(good)
                    report.in_flight_lines = None
                    break
                report.in_flight_lines = None
                report.acknowledged += len(good)
                report.accepted += outcome.accepted
                report.duplicates += outcome.duplicates
                for index, reason in sorted(outcome.rejected.items()):
                    row = good[index] if 0 <= index < len(good) else good[0]
                    server_rejects.append(Reject(row.line, "server", reason, row.raw, row.index))
                report.rejected_server += len(server_rejects)
            _record(report, writer, sorted(pending + server_rejects, key=lambda r: r.line))
            pending = []
            last = max(r.line for r in good + bad)
            report.last_line_acknowledged = last
            advance(last)
    except KeyboardInterrupt:
        report.interrupted = True
        report.stopped = "interrupted (Ctrl-C)"
    finally:
        if pending:
            _record(report, writer, pending)
        bar.close()
        writer.close()
    return report


def _record(report: BulkReport, writer: RejectsWriter, rejects: list[Reject]) -> None:
    report.rejected_file += sum(r.source != "server" for r in rejects)
    report._keep(rejects)
    writer.write(rejects)


def check_all(
    rows: Iterable[Row[T]],
    check: Callable[[T], str | None],
    report: BulkReport,
    rejects: RejectsWriter | None,
    total_lines: int | None,
    from_line: int = 1,
) -> bool:
    """``--strict``'s first pass: read and check every row, send nothing. True when all are good."""
    from tqdm import tqdm

    writer = rejects or RejectsWriter(None)
    bad: list[Reject] = []
    with tqdm(total=total_lines, desc=f"check {report.noun}", unit="line", file=sys.stderr, leave=False) as bar:
        last = from_line - 1
        for row in rows:
            if row.line < from_line:
                continue
            report.rows += 1
            reason = row.error
            source = "file"
            if reason is None and row.value is not None:
                reason, source = check(row.value), "check"
            if reason is not None:
                bad.append(Reject(row.line, source, reason, row.raw, row.index))
            bar.update(row.line - last)
            last = row.line
    if bad:
        report.strict_refused = True
        report.rejected_file = len(bad)
        report._keep(bad)
        writer.write(bad)
    writer.close()
    return not bad


def first_readable(rows: Iterable[Row[T]]) -> tuple[Row[T] | None, Row[T] | None, int]:
    """(first readable row, first unreadable row, rows read) of a pre-scan that stops at the first good row.

    A file whose every row is unreadable is not "some rows rejected": it is the
    wrong file or the wrong format, and nothing could be sent, so the CLI exits
    2 for it. The scan keeps nothing in memory and usually stops at line 2.
    """
    first_bad: Row[T] | None = None
    n = 0
    for row in rows:
        n += 1
        if row.error is None and row.value is not None:
            return row, first_bad, n
        if first_bad is None:
            first_bad = row
    return None, first_bad, n


def require_readable(path: Path, rows: Iterable[Row[T]]) -> None:
    """EventFileError (exit 2) unless at least one row of ``rows`` is readable."""
    good, bad, n = first_readable(rows)
    if good is None and bad is not None:
        more = f" (all {n} rows are unreadable)" if n > 1 else ""
        raise EventFileError(f"{path}:{bad.line}: {bad.error}{more}; nothing in the file can be sent")
