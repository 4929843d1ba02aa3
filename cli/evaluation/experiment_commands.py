"""`stylerec experiment style-lambda`: choose λ and the style-confidence threshold offline.

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
    exp = sub.add_parser("experiment", help="offline experiments (synthetic benchmarks)")
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
