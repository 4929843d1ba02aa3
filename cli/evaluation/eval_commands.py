"""`stylerec eval`: offline accuracy of every scoring algorithm on a public data set.

Writes the full report as JSON under out/eval/ and prints a Markdown table, so the
numbers quoted in docs/scoring.md can be regenerated with one command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cli.errors import UsageError
from services.scoring.evaluation.choices import DEFAULT_ALGORITHMS, TARGETS

REPO = Path(__file__).resolve().parents[2]  # cli/<package>/<module>.py -> the repository
OUT_DIR = REPO / "out" / "eval"
DATASETS = ["ml-100k", "online-retail", "csv", "synthetic"]
# Options that belong to one data set: giving one implies it, giving it to another is refused.
CSV_OPTIONS = {
    "interactions": "--interactions",
    "user_col": "--user-col",
    "item_col": "--item-col",
    "time_col": "--time-col",
    "rating_col": "--rating-col",
    "sep": "--sep",
}
RETAIL_OPTIONS = {"path": "--path"}
# Protocols that order each user's interactions by time.
TIME_PROTOCOLS = ("temporal", "leave-last-out")


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate the scoring algorithms on ml-100k, online-retail or any CSV")
    p.add_argument(
        "dataset",
        nargs="?",
        choices=DATASETS,
        help="data set (default ml-100k; --interactions implies csv, --path implies online-retail)",
    )
    p.add_argument("--path", type=Path, help="online-retail file (default ../shared/data/online-retail/...)")
    p.add_argument("--interactions", type=Path, help="CSV/TSV file of interactions (implies dataset csv)")
    p.add_argument("--user-col")
    p.add_argument("--item-col")
    p.add_argument("--time-col")
    p.add_argument("--rating-col")
    p.add_argument("--sep", help="field separator of --interactions (default ','; use '\\t' for tabs)")
    p.add_argument(
        "--protocol",
        choices=["stratified-item", "temporal", "leave-last-out"],
        help="default: stratified-item for ml-100k/csv/synthetic, temporal for online-retail",
    )
    p.add_argument(
        "--algorithms",
        default=",".join(DEFAULT_ALGORITHMS),
        help="comma separated; a model name or a repeat-aware blend <model>+history (e.g. ease+history)",
    )
    p.add_argument(
        "--targets",
        default="new",
        choices=TARGETS,
        help=(
            "which test items count: new = only items the user never had (default, seen items left out of"
            " the rankings), all = every test item, repeat = only rebuys of items the user had"
        ),
    )
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-tune", action="store_true", help="use default parameters (no validation search)")
    p.add_argument("--out", type=Path, help="JSON output file (default out/eval/<dataset>-<protocol>.json)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(func=cmd_eval)


def resolve_dataset(args: argparse.Namespace) -> str:
    """The data set the options mean, or UsageError when they contradict each other.

    Without this, `stylerec eval --interactions F --user-col u ...` (no word
    `csv`) silently evaluated ML-100K and reported its numbers as if they were F's.
    """
    csv_given = [flag for name, flag in CSV_OPTIONS.items() if getattr(args, name) is not None]
    retail_given = [flag for name, flag in RETAIL_OPTIONS.items() if getattr(args, name) is not None]
    if csv_given and retail_given:
        raise UsageError(
            f"{', '.join(retail_given)} (online-retail) and {', '.join(csv_given)} (csv) name two different data "
            "sets: pass one of them"
        )
    implied = "csv" if csv_given else "online-retail" if retail_given else None
    given = args.dataset
    if given is not None and implied is not None and given != implied:
        flags = ", ".join(csv_given or retail_given)
        raise UsageError(f"data set {given} contradicts {flags}, which only the {implied} data set uses")
    dataset = given or implied or "ml-100k"
    if dataset == "csv":
        if args.interactions is None or args.user_col is None or args.item_col is None:
            raise UsageError("dataset csv needs --interactions FILE --user-col C --item-col C")
        if not args.interactions.is_file():
            raise UsageError(f"--interactions {args.interactions}: no such file")
    return dataset


def load_dataset(args: argparse.Namespace) -> Any:
    from services.scoring.evaluation import datasets

    try:
        if args.dataset == "ml-100k":
            if datasets.ml100k_path() is None:
                print("stylerec: ml-100k not installed; falling back to SYNTHETIC data", file=sys.stderr)
                return datasets.synthetic()
            return datasets.ml100k()
        if args.dataset == "online-retail":
            path = args.path or datasets.ONLINE_RETAIL_DEFAULT
            if args.path is None and not path.exists():
                print(f"stylerec: {path} missing; falling back to SYNTHETIC data", file=sys.stderr)
                return datasets.synthetic()
            return datasets.online_retail(path)
        if args.dataset == "csv":
            sep = "," if args.sep is None else "\t" if args.sep in ("\\t", "tab") else args.sep
            return datasets.csv_interactions(
                args.interactions, args.user_col, args.item_col, args.time_col, args.rating_col, sep
            )
        return datasets.synthetic()
    except datasets.DatasetError as exc:
        raise UsageError(str(exc)) from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from services.scoring.evaluation import harness
    from services.scoring.models import ALGORITHMS

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if not harness.known_algorithm(a)]
    if unknown:
        raise UsageError(
            f"unknown algorithm(s) {unknown}; known: {', '.join(sorted(ALGORITHMS))}, or <model>+history"
            " (a repeat-aware blend of any of them but history)"
        )
    if not 1 <= args.k <= 1000:
        raise UsageError("-k must be between 1 and 1000")
    args.dataset = resolve_dataset(args)
    protocol = args.protocol or ("temporal" if args.dataset == "online-retail" else "stratified-item")
    if protocol in TIME_PROTOCOLS and args.dataset == "csv" and not args.time_col:
        raise UsageError(f"protocol {protocol} orders interactions by time: pass --time-col (the column with times)")
    data = load_dataset(args)
    steps = len(harness.run_order(algorithms))
    with tqdm(total=steps, desc=f"eval {data.name}", unit="algo", file=sys.stderr) as bar:
        try:
            report = harness.evaluate(
                data,
                protocol,
                algorithms,
                k=args.k,
                seed=args.seed,
                do_tune=not args.no_tune,
                progress=lambda msg: bar.set_postfix_str(msg[:60]),
                on_step=lambda: bar.update(1),
                targets=args.targets,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    suffix = "" if args.targets == "new" else f"-{args.targets}"
    out = args.out or OUT_DIR / f"{data.name}-{protocol}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(harness.format_table(report))
        if "published_nDCG@10" in report:
            pub = ", ".join(f"{k} {v}" for k, v in report["published_nDCG@10"].items())
            verdict = "beats" if report["beats_all_published"] else "does NOT beat"
            print(f"\npublished nDCG@10: {pub}\nbest: {report['best']} — {verdict} all published values")
        print(f"\nreport: {out}")
    return 0
