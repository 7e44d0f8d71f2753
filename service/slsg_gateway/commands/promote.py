"""``slsg promote``: the promotion gate between a candidate version and the one it would replace.

Exit status 0: the candidate passed (and, with ``--load``, the gateway serves it); 1: refused (and
nothing loaded); 2: the gate could not run. The measures are in :mod:`slsg_gateway.feedback.promotion`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", required=True, help="NAME:N, the version to promote")
    parser.add_argument("--against", required=True, help="NAME:M, the version it would replace")
    parser.add_argument("--data", required=True, type=Path,
                        help="data set root from `slsg dataset from-reviews` (its test/ images are scored)")
    parser.add_argument("--category", help="category folder under --data (default: the model name, or the only one)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository holding both versions (default model_repository)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold on the calibrated score (default 0.5, the calibrated one; "
                             "use the gateway's SLSG_THRESHOLDS value for this model if it has one)")
    parser.add_argument("--load", action="store_true", help="if the candidate passes, make the gateway serve it")
    parser.add_argument("--gateway", default=os.environ.get("SLSG_GATEWAY_URL", "http://127.0.0.1:8000"),
                        help="gateway URL for --load (default $SLSG_GATEWAY_URL or http://127.0.0.1:8000)")
    parser.add_argument("--admin-key", default=os.environ.get("SLSG_ADMIN_KEY"),
                        help="admin key for --load (default $SLSG_ADMIN_KEY)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from slsg.contract import DECISION_THRESHOLD
    from slsg_gateway.feedback.promotion import GateError, gate, gate_images, parse_version, score_version

    try:
        (name, candidate), (other, incumbent) = parse_version(args.candidate), parse_version(args.against)
        if name != other:
            raise GateError(f"--candidate {args.candidate} and --against {args.against} name different models")
        if args.load and not args.admin_key:
            raise GateError("--load needs an admin key: --admin-key or $SLSG_ADMIN_KEY")
        images = gate_images(_category_dir(args.data, args.category, name))
        threshold = DECISION_THRESHOLD if args.threshold is None else args.threshold
        result = gate(score_version(args.repository, name, candidate, images, threshold),
                      score_version(args.repository, name, incumbent, images, threshold))
    except (GateError, ValueError) as exc:
        print(f"slsg promote: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1) if args.json else _table(result))
    if not result.passed:
        if args.load:
            print(f"slsg promote: {name}:{candidate} refused; nothing loaded", file=sys.stderr)
        return 1
    return _load(args, name, candidate) if args.load else 0


def _category_dir(root: Path, category: str | None, name: str) -> Path:
    from slsg_gateway.feedback.promotion import GateError

    if category:
        return root / category
    if (root / name).is_dir():
        return root / name
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if len(folders) != 1:
        raise GateError(f"{root}: name the category with --category (found {[p.name for p in folders]})")
    return folders[0]


def _table(result) -> str:
    rows = [("", "candidate", "incumbent")]
    for label, key in (("version", "version"), ("normal frames", "normals"), ("defects", "defects"),
                       ("false alarms", "false_alarms"), ("misses", "misses"), ("image AUROC", "auroc")):
        values = [getattr(v, key) for v in (result.candidate, result.incumbent)]
        rows.append((label, *("n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)
                              for x in values)))
    lines = [f"{a:<14}{b:>11}{c:>11}" for a, b, c in rows]
    verdict = "PASS" if result.passed else "REFUSED"
    lines.append(f"{verdict}: {'; '.join(result.reasons)} (threshold {result.candidate.threshold:g})")
    return "\n".join(lines)


def _load(args: argparse.Namespace, name: str, version: int) -> int:
    """Ask the gateway to serve ``version``: a plain load when it is the newest, else a pin to it."""
    import httpx

    from slsg.contract import list_versions

    newest = max(list_versions(args.repository, name), default=version)
    body = None if version == newest else {"version": version}
    try:
        response = httpx.post(f"{args.gateway.rstrip('/')}/v1/models/{name}/load", json=body,
                              headers={"X-API-Key": args.admin_key}, timeout=120)
    except httpx.HTTPError as exc:
        print(f"slsg promote: {name}:{version} passed but the gateway at {args.gateway} could not be reached: {exc}",
              file=sys.stderr)
        return 2
    served = response.json().get("served_version") if response.status_code == 200 else None
    if served != version:
        print(f"slsg promote: {name}:{version} passed but the gateway did not load it "
              f"({response.status_code}): {response.text}", file=sys.stderr)
        return 2
    print(f"loaded: the gateway at {args.gateway} serves {name} version {served}")
    return 0
