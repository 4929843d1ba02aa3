"""`stylerec experiment ...`: style-lambda (offline λ choice), report (an online experiment's
per-arm rates with intervals) and online (the report's proof on simulated shoppers).

`stylerec experiment style-lambda` chooses λ and the style-confidence threshold offline.

The gateway's defaults (STYLEREC_STYLE_LAMBDA, STYLEREC_STYLE_CONFIDENCE_THRESHOLD)
come from this command's output; it runs on a SYNTHETIC labelled benchmark
(see cli/evaluation/experiment_style_lambda.py) and says so in everything it prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.localstack.stack import REPO

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images"


def register(sub: Any) -> None:
    exp = sub.add_parser("experiment", help="offline (synthetic) and online experiments")
    esub = exp.add_subparsers(dest="experiment", required=True)
    p = esub.add_parser("style-lambda", help="choose the gateway's λ and confidence threshold (SYNTHETIC users)")
    p.add_argument(
        "--images-dir",
        type=Path,
        help=f"folder with products/ and styles/ (default {DEFAULT_IMAGES}; generated images when that is missing)",
    )
    p.add_argument("--users", type=int, default=3000, help="simulated users per population (half choose, half report)")
    p.add_argument("--seed", type=int, default=42, help="first seed")
    p.add_argument("--seeds", type=int, default=5, help="independent populations averaged over")
    p.add_argument("--style-share", type=float, default=0.5, help="share of simulated users who choose by style")
    p.add_argument("--half-weight", type=float, default=20.0, help="scoring's profile_half_confidence_weight")
    p.add_argument(
        "--uncentred",
        action="store_true",
        help="compare: plain cosines instead of catalog-centred ones (writes style_lambda_uncentred.json)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "experiment")
    p.add_argument("--json", action="store_true", help="print the result JSON")
    p.set_defaults(func=cmd_style_lambda)

    r = esub.add_parser("report", help="per-arm CTR and conversion of an online experiment, with 95% intervals")
    r.add_argument("--experiment", help="experiment name (default: the only one in the archive)")
    r.add_argument("--control", help="the arm the others are compared with (default: 'control', else the first)")
    r.add_argument("--mongo-uri", help="MongoDB holding the impression archive (default: the running local stack's)")
    r.add_argument("--db", default="stylerec", help="database name")
    r.add_argument("--impressions-collection", default="impressions")
    r.add_argument("--attributions-collection", default="attributions")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_report)

    o = esub.add_parser("online", help="planted-lift and A/A experiments on SIMULATED shoppers through the real stack")
    o.add_argument("--users", type=int, default=400, help="simulated shoppers per experiment (20..20000)")
    o.add_argument("--requests-per-user", type=int, default=2, help="recommendation lists each shopper sees (1..20)")
    o.add_argument("--seed", type=int, default=7, help="seed of the catalog, the users and their reactions")
    o.add_argument("--out-dir", type=Path, default=REPO / "out" / "experiment")
    o.add_argument("--json", action="store_true", help="print the result JSON")
    o.set_defaults(func=cmd_online)


def cmd_style_lambda(args: argparse.Namespace) -> int:
    from cli.errors import UsageError
    from cli.evaluation.experiment_style_lambda import run_experiment

    if args.users < 20:
        raise UsageError("--users must be at least 20")
    if not 1 <= args.seeds <= 50:
        raise UsageError("--seeds must be between 1 and 50")
    if not 0.0 <= args.style_share <= 1.0:
        raise UsageError("--style-share must be between 0 and 1")
    if args.half_weight <= 0:
        raise UsageError("--half-weight must be positive")
    if args.images_dir is not None and not args.images_dir.is_dir():
        # An explicit folder that is missing must not quietly become the generated catalog.
        raise UsageError(f"--images-dir {args.images_dir}: not a folder")
    images_dir = args.images_dir or DEFAULT_IMAGES
    images = images_dir if images_dir.exists() else None
    result = run_experiment(
        images,
        args.out_dir,
        n_users=args.users,
        seed=args.seed,
        half_weight=args.half_weight,
        n_seeds=args.seeds,
        style_share=args.style_share,
        centred=not args.uncentred,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    t = result["test"]
    print("SYNTHETIC BENCHMARK: simulated users with planted style preferences, not real shoppers")
    print("style similarity: " + ("UNCENTRED cosines (comparison)" if args.uncentred else "catalog-centred cosines"))
    print(f"catalog: {result['catalog']['items']} items; {result['catalog']['images']}")
    print(
        f"chosen on the validation half: λ = {result['chosen']['lambda']}, "
        f"confidence threshold = {result['chosen']['confidence_threshold']}"
    )
    print(
        f"  (validation nDCG@10 {result['grid_best_validation']:.4f}; with no confidence gate at all: "
        f"{result['ungated_validation_ndcg10']:.4f}; the confidence ranks style-driven users above the others "
        f"with AUC {result['confidence_auc_for_style_driven_users']:.2f}, 0.5 = not at all)"
    )
    print(f"test halves ({t['users']} users over {len(result['simulation']['seeds'])} populations), nDCG@10:")
    print(f"  {'':<22}{'CF only':>10}{'CF + style':>12}")
    print(f"  {'all users':<22}{t['ndcg10_cf_only']:>10.4f}{t['ndcg10_with_style_rerank']:>12.4f}")
    for name in ("style_driven_users", "other_users"):
        g = t[name]
        label = f"{name.replace('_', ' ')} ({g['users']})"
        print(f"  {label:<22}{g['ndcg10_cf_only']:>10.4f}{g['ndcg10_with_style_rerank']:>12.4f}")
    print(f"  on the style path: {t['style_path_share']:.0%} of users")
    gains = ", ".join(f"{g:+.4f}" for g in t["per_seed_gain"])
    print(f"  nDCG@10 gain per population (seeds {result['simulation']['seeds']}): {gains}")
    name = "style_lambda_uncentred.json" if args.uncentred else "style_lambda.json"
    print(f"written: {args.out_dir / name}  ({result['wall_seconds']} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import sys

    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    from cli.errors import UsageError
    from cli.evaluation.experiment_report import ReportInputError, build_report, format_report
    from cli.localstack.stack import Stack, stack_dir

    uri = args.mongo_uri
    if not uri:
        stack = Stack.load(stack_dir())
        if "mongo" not in stack.components:
            raise UsageError(f"no running stack found in {stack.dir}: run `stylerec up` or pass --mongo-uri")
        uri = stack.mongo_uri
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise UsageError(f"--mongo-uri must start with mongodb:// or mongodb+srv://, got {uri[:40]!r}")
    client: MongoClient[Any] = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        report = build_report(
            client[args.db], args.experiment, args.control, args.impressions_collection, args.attributions_collection
        )
    except ReportInputError as exc:
        raise UsageError(str(exc)) from exc
    except PyMongoError as exc:
        print(f"stylerec: error: cannot read the impression archive: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_report(report)))
    return 0


def cmd_online(args: argparse.Namespace) -> int:
    from cli.errors import UsageError
    from cli.evaluation.experiment_online import SYNTHETIC, run_online, write

    if not 20 <= args.users <= 20000:
        raise UsageError("--users must be between 20 and 20000")
    if not 1 <= args.requests_per_user <= 20:
        raise UsageError("--requests-per-user must be between 1 and 20")
    quiet = args.json

    def progress(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    result = run_online(args.users, args.requests_per_user, args.seed, progress=progress)
    path = write(result, args.out_dir)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if all(result["checks"].values()) else 1
    from cli.evaluation.experiment_report import format_report

    print(SYNTHETIC)
    p = result["pipeline"]
    print(
        f"pipeline: {p['impressions_archived']}/{p['impressions_sent']} impressions archived, "
        f"{p['attributed_as_planted']}/{p['outcomes_planted']} planted outcomes attributed "
        f"({p['attributed_not_planted']} attributed that were not planted)"
    )
    for exp, report in result["reports"].items():
        print(f"[{exp}]")
        print("\n".join(format_report(report)))
    for check, ok in result["checks"].items():
        print(f"check {check}: {'PASS' if ok else 'FAIL'}")
    print(f"written: {path}  ({result['wall_seconds']} s)")
    return 0 if all(result["checks"].values()) else 1
