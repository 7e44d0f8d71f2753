"""Part counts in the contract: the card's part kinds, Triton's extra output, and the answer's explanations.
Torch-free: the exported component check itself is tested in tests/train/test_component.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_fixtures import make_card
from slsg.contract import OUTPUT_PART_COUNTS, ModelCard, PartKind, explain_counts
from slsg.triton_config import card_from_config, parse_config, production_config
from slsg_gateway.backends.base import ServedModel, requested_outputs
from slsg_gateway.batching import BatchItem
from slsg_gateway.inspection import explanations

KINDS = [PartKind("kind 1 (red)", expected=2), PartKind("kind 2 (grey)", expected=4, tolerance=1)]


def test_a_card_from_before_part_kinds_loads_without_them_and_a_new_one_round_trips():
    old = json.loads(make_card().to_json())
    del old["part_kinds"]
    assert ModelCard.from_json(json.dumps(old)).part_kinds == []
    card = make_card(part_kinds=KINDS)
    assert ModelCard.from_json(card.to_json()) == card


def test_counts_off_by_more_than_the_tolerance_are_explained():
    card = make_card(part_kinds=KINDS)
    assert explain_counts(card, np.array([2.0, 4.0], np.float32)) == []
    assert explain_counts(card, [2, 5]) == []  # within grey's tolerance of one
    assert explain_counts(card, [3, 2]) == [{"part": "kind 1 (red)", "found": 3, "expected": 2},
                                            {"part": "kind 2 (grey)", "found": 2, "expected": 4}]
    with pytest.raises(ValueError, match="3 columns.*2 part kinds"):
        explain_counts(card, [2, 4, 1])


def test_triton_config_and_requested_outputs_have_part_counts_only_when_the_card_lists_part_kinds():
    plain, counted = make_card(), make_card(part_kinds=KINDS)
    assert OUTPUT_PART_COUNTS not in production_config("toy", plain)
    assert OUTPUT_PART_COUNTS not in requested_outputs(plain) and OUTPUT_PART_COUNTS not in requested_outputs(None)
    config = parse_config(production_config("toy", counted))
    assert [(o.name, list(o.dims)) for o in config.output][-1] == (OUTPUT_PART_COUNTS, [-1])  # any version's
    assert card_from_config(config) == counted
    assert requested_outputs(counted)[-1] == OUTPUT_PART_COUNTS


def test_the_answer_explains_only_for_a_model_that_counts_parts():
    item = BatchItem(1, np.zeros((4, 4), np.float32), 0.7, 1.0, np.array([1, 4], np.float32))
    counted = ServedModel("toy", (1,), 1, True, make_card(part_kinds=KINDS), 64, 64)
    assert [e.model_dump() for e in explanations(counted, item)] == [
        {"part": "kind 1 (red)", "found": 1, "expected": 2}]
    plain = ServedModel("toy", (1,), 1, True, make_card(), 64, 64)
    assert explanations(plain, item) == []


def test_counts_are_read_with_the_card_of_the_version_that_answered():
    """A redeploy between a request's look-up and its inference: version 2 answered with three part kinds
    while ``model`` still describes version 1 with two."""
    three = [*KINDS, PartKind("kind 3 (blue)", expected=1)]
    model_v1 = ServedModel("toy", (1, 2), 1, True, make_card(part_kinds=KINDS), 64, 64)
    counts = np.array([2, 4, 3], np.float32)
    answered = BatchItem(2, np.zeros((4, 4), np.float32), 0.7, 1.0, counts, make_card(part_kinds=three))
    assert [e.model_dump() for e in explanations(model_v1, answered)] == [
        {"part": "kind 3 (blue)", "found": 3, "expected": 1}]
    # a backend that could not say which card answered: no explanation rather than the wrong card's
    unknown = BatchItem(2, np.zeros((4, 4), np.float32), 0.7, 1.0, counts)
    assert explanations(model_v1, unknown) == []
