"""``slsg promote``: the promotion gate between a candidate version and the one it would replace.

``--load`` deploys a candidate that passes the way ``slsg deploy`` does: it writes the model's
desired state (``serving.json`` in the repository), which every gateway follows by itself; with
``--gateway`` it also waits until that gateway serves it. Exit status 0: the candidate passed (and,
with ``--load``, is deployed); 1: refused, nothing deployed; 2: the gate could not run, or the
gateway did not serve the candidate in time. The measures are in :mod:`slsg_gateway.feedback.promotion`.
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
    parser.add_argument("--load", action="store_true",
                        help="if the candidate passes, deploy it: write NAME/serving.json in --repository, which "
                             "every gateway follows (as `slsg deploy NAME --version N`)")
    parser.add_argument("--gateway", help="with --load: wait until the gateway at this URL serves the candidate")
    parser.add_argument("--api-key", default=os.environ.get("SLSG_API_KEY"),
                        help="key for --gateway's GET /v1/models when the gateway has keys (default $SLSG_API_KEY)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for --gateway (default 60)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from slsg.contract import DECISION_THRESHOLD
    from slsg_gateway.feedback.promotion import GateError, gate, gate_images, parse_version, score_version

    try:
        (name, candidate), (other, incumbent) = parse_version(args.candidate), parse_version(args.against)
        if name != other:
            raise GateError(f"--candidate {args.candidate} and --against {args.against} name different models")
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
            print(f"slsg promote: {name}:{candidate} refused; nothing deployed", file=sys.stderr)
        return 1
    return _deploy(args, name, candidate) if args.load else 0


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


def _deploy(args: argparse.Namespace, name: str, version: int) -> int:
    """Write the desired state every gateway follows; with --gateway, wait until that one serves it."""
    from slsg.contract import ServingStateError, serving_path, write_serving_state

    try:
        state = write_serving_state(args.repository, name, version)
    except (ServingStateError, ValueError) as exc:
        print(f"slsg promote: {name}:{version} passed but could not be deployed: {exc}", file=sys.stderr)
        return 2
    print(f"deployed: every gateway will serve {name} version {version} (was {state.previous}); "
          f"desired state in {serving_path(args.repository, name)}")
    if not args.gateway:
        return 0
    served = _wait_until_served(args.gateway, args.api_key, name, version, args.wait)
    if served != version:
        print(f"slsg promote: the gateway at {args.gateway} still serves {name} version {served} after "
              f"{args.wait:g} s (is its SLSG_SERVING_ROOT this repository?)", file=sys.stderr)
        return 2
    print(f"the gateway at {args.gateway} serves {name} version {version}")
    return 0


def _wait_until_served(url: str, api_key: str | None, name: str, version: int, wait_s: float) -> int | None:
    """The version the gateway serves once it is ``version``, or the last one seen when ``wait_s`` ran out."""
    import time

    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    deadline, served = time.monotonic() + wait_s, None
    while True:
        try:
            models = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10).json()["models"]
            served = next((m["served_version"] for m in models if m["name"] == name), None)
        except (httpx.HTTPError, KeyError, ValueError):
            served = None
        if served == version or time.monotonic() > deadline:
            return served
        time.sleep(0.5)
