"""The authors' network as numbers (``shared/reference/authors_slsg``): where it is, and weight files in
their format regenerated from its manifest by its rule B (never committed: tests write them to tmp_path)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# beside the clone (as CI lays it out), or where SLSG_AUTHORS_REFERENCE says
REFERENCE_DIR = Path(os.environ.get("SLSG_AUTHORS_REFERENCE",
                                    REPO_ROOT.parent / "shared" / "reference" / "authors_slsg"))


def reference_dir() -> Path:
    """The reference folder, or skip the test that needs it."""
    if not (REFERENCE_DIR / "manifest.json").is_file():
        pytest.skip(f"the authors' reference numbers are not at {REFERENCE_DIR} (CI puts shared/ beside the "
                    "clone; elsewhere set SLSG_AUTHORS_REFERENCE)")
    return REFERENCE_DIR


def manifest_tensors(ref: Path) -> list[tuple[str, list[int], str]]:
    manifest = json.loads((ref / "manifest.json").read_text())
    return [tuple(t) for t in manifest["files"][0]["tensors"]]


def rule_b_tensor(rng: np.random.Generator, key: str, shape: list[int], dtype: str) -> np.ndarray:
    """One tensor by the manifest's ``weight_fill_rule_B`` (draws from ``rng`` in the manifest's order)."""
    if dtype == "int64":
        return np.zeros(shape, np.int64)  # num_batches_tracked: no draw
    if key.endswith(".running_var"):
        return (1.0 + 0.1 * rng.random(shape)).astype(np.float32)
    if key.endswith(".running_mean"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if key.endswith(".weight") and len(shape) >= 2:
        return (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)
    if key.endswith(".weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def rule_b_state(ref: Path) -> "OrderedDict[str, torch.Tensor]":
    """Their state dict filled by rule B, checked tensor by tensor against the reference's SHA-256."""
    hashes = json.loads((ref / "reference.json").read_text())["rule_B"]["sha256_of_each_generated_tensor_bytes"]
    rng = np.random.default_rng(1234)
    state = OrderedDict()
    for key, shape, dtype in manifest_tensors(ref):
        array = rule_b_tensor(rng, key, shape, dtype)
        if hashlib.sha256(array.tobytes()).hexdigest() != hashes[key]:
            raise AssertionError(f"rule B regenerated {key} differently from the reference")
        state[key] = torch.from_numpy(array)
    return state


def write_rule_b_weights(ref: Path, path: Path) -> Path:
    """A ``<category>.tch`` in their format (a plain state dict) holding rule-B weights."""
    torch.save(rule_b_state(ref), path)
    return path


def parity(ref: Path, weights: Path) -> dict:
    """The paper preset with ``weights`` (their format) against their numbers for ``input.png``."""
    from slsg_train.models.authors import authors_network, read_authors_state

    model, _ = authors_network(read_authors_state(weights))
    captured = {}
    hook = model.graph.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        out = model(torch.from_numpy(np.load(ref / "input_tensor.npy")))
        graph = model.graph
        neighbours = graph.neighbours(graph.query_key(graph.fc_in(captured["x"])).flatten(2), 16, 16).numpy()
    hook.remove()
    probability = torch.softmax(out.logits, dim=1)[0, 1].flatten()
    return {
        "max_abs_logit_diff": float(np.abs(out.logits.numpy() - np.load(ref / "B_input_logits.npy")).max()),
        "max_abs_aux_logit_diff": float(np.abs(out.aux_logits.numpy() - np.load(ref / "B_input_aux_logits.npy")).max()),
        "differing_neighbour_indices": int((neighbours != np.load(ref / "B_gcn_neighbors.npy")).sum()),
        "score_top100_mean": float(probability.topk(100).values.mean()),
    }


if __name__ == "__main__":  # python tests/authors_fixtures.py OUT.tch: write rule-B weights, print the parity
    import sys

    out = write_rule_b_weights(REFERENCE_DIR, Path(sys.argv[1]))
    print(json.dumps({"weights": str(out), "threads": torch.get_num_threads(), **parity(REFERENCE_DIR, out)}, indent=2))
