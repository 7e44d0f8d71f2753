"""``slsg deploy NAME --version N | --latest``: choose the version every gateway serves.

Writes the model's desired state, ``<repository>/NAME/serving.json``; every gateway polls it
(``SLSG_RECONCILE_INTERVAL_S``) and loads that version by itself. A rollback is the same command
with the older version. ``--latest`` resolves to the newest version present now: a later export
does not go live until it is deployed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name (its folder in the repository)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="serve this version (an older one: a rollback)")
    which.add_argument("--latest", action="store_true", help="serve the newest version in the repository now")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository root (default: ./model_repository)")


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg.contract import (
        ServingStateError, list_versions, serving_path, validate_model_name, write_serving_state,
    )

    try:
        validate_model_name(args.name)
        versions = list_versions(args.repository, args.name)
        version = (versions[-1] if versions else 0) if args.latest else args.version
        state = write_serving_state(args.repository, args.name, version)
    except (ServingStateError, ValueError) as exc:
        print(f"slsg deploy: {exc}", file=sys.stderr)
        return 2
    was = "first deploy" if state.previous is None else f"was {state.previous}"
    print(f"{state.model}: every gateway will serve version {state.version} ({was}); "
          f"desired state in {serving_path(args.repository, args.name)}")
    return 0
