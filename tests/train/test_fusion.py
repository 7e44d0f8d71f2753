"""The fusion rule (training/fusion.py): parts near chance on simulated anomalies get no say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnx_fixtures import export_and_serve
from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.training.fusion import (
    PART_COPIED, SLSG_MAP, STRUCTURAL, copy_part, find_parts, fusion_messages, parts_to_leave_out,
    remove_part, separations,
)

SIZE = 64
PARTS = (((210, 40, 40), 2, 5), ((40, 70, 210), 3, 4))  # colour, count, half side (px)


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A grey floor with two red and three blue squares at random places that do not touch."""
    while True:
        image = np.full((SIZE, SIZE, 3), 150, np.uint8) + rng.integers(0, 6, (SIZE, SIZE, 3), dtype=np.uint8)
        placed: list[tuple[int, int]] = []
        for colour, count, half in PARTS:
            for _ in range(count):
                spots = [(int(y), int(x)) for y, x in rng.integers(half + 1, SIZE - half - 1, (100, 2))]
                free = [(y, x) for y, x in spots if all(abs(y - py) > 14 or abs(x - px) > 14 for py, px in placed)]
                if free:
                    y, x = free[0]
                    image[y - half:y + half, x - half:x + half] = colour
                    placed.append((y, x))
        if len(placed) == 5:
            return image


def _separations(scores: dict[str, tuple[float, float]], learnt=None, n: int = 30):
    """Parts whose normal scores are N(0, 1) and whose anomalies' are N(shift, 1) for each kind (kind -> shift)."""
    rng = np.random.default_rng(0)
    normal = {name: rng.normal(size=n) for name in scores}
    anomalous = {kind: {name: rng.normal(shift[i], 1, size=2 * n) for name, shift in scores.items()}
                 for i, kind in enumerate((STRUCTURAL, PART_COPIED))}
    return separations(normal, anomalous, learnt or {})


def test_a_part_that_scores_noise_is_left_out_and_one_that_separates_kept():
    parts = _separations({SLSG_MAP: (0.0, 0.0), "patch_memory": (3.0, 0.0), "component_check": (0.0, 3.0),
                          "composition_check": (0.1, -0.1)})
    out = {p.name for p in parts_to_leave_out(parts, {SLSG_MAP, "patch_memory", "component_check",
                                                      "composition_check"})}
    assert out == {SLSG_MAP, "composition_check"}  # each of the others separates one kind


def test_the_kinds_a_part_learnt_do_not_count_for_it():
    # SLSG's network separates the structural kind it was trained on, and nothing else
    parts = _separations({SLSG_MAP: (3.0, 0.0), "patch_memory": (3.0, 3.0)}, learnt={SLSG_MAP: {STRUCTURAL}})
    assert [p.name for p in parts_to_leave_out(parts, {SLSG_MAP, "patch_memory"})] == [SLSG_MAP]
    assert set(parts[0].by_kind) == {PART_COPIED}


def test_the_best_part_and_the_last_map_stay_in_even_at_chance():
    parts = _separations({SLSG_MAP: (0.0, 0.0), "patch_memory": (0.0, 0.2)})
    assert len(parts_to_leave_out(parts, {SLSG_MAP, "patch_memory"})) == 1  # one of two at chance: the best stays
    # an image check separates, the maps do not: the better map stays, the anomaly map needs one
    parts = _separations({SLSG_MAP: (0.0, 0.0), "patch_memory": (0.0, 0.1), "global_branch": (3.0, 3.0)})
    out = parts_to_leave_out(parts, {SLSG_MAP, "patch_memory"})
    assert len(out) == 1 and out[0].name in (SLSG_MAP, "patch_memory")
    # a part no kind judges (SLSG's map where the images have no parts to copy or remove) stays in
    parts = _separations({SLSG_MAP: (0.0, 0.0), "patch_memory": (3.0, 3.0)},
                         learnt={SLSG_MAP: {STRUCTURAL, PART_COPIED}})
    assert parts_to_leave_out(parts, {SLSG_MAP, "patch_memory"}) == []


def test_simulated_part_anomalies_add_or_remove_one_part():
    rng = np.random.default_rng(1)
    image = _scene(rng)
    assert len(find_parts(image)) == 5
    assert len(find_parts(copy_part(image, rng))) == 6
    assert len(find_parts(remove_part(image, rng))) == 4
    assert copy_part(np.full((SIZE, SIZE, 3), 150, np.uint8), rng) is None  # nothing to copy


@pytest.fixture(scope="module")
def selected() -> tuple[SLSG, dict]:
    """An untrained SLSG head (its map is noise) beside a fitted component check, the fusion selected."""
    from slsg_train.training.calibration import fit_checks

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SLSG(preset("default", patch_memory=False, composition_check=False, component_check=True,
                        component_clusters=4))
    normal = [_scene(rng) for _ in range(16)]
    scale = [_scene(rng) for _ in range(12)]
    report = fit_checks(model, normal, scale, top_k=top_k_for_size(SIZE, SIZE), progress=False, select=True)
    return model.eval(), report


def test_fitting_leaves_the_noisy_map_out_and_says_why(selected):
    from slsg_train.commands.info import fused_parts

    model, report = selected
    fusion = report["fusion"]
    assert fusion["separation"]["component_check"][PART_COPIED] > 0.9
    assert set(fusion["left_out"]) == {SLSG_MAP} and model.config.fuse_slsg_map is False
    assert fused_parts(model) == ["component_check"]
    [message] = fusion_messages(fusion)
    assert message.startswith("left out of the fusion: SLSG's own map, separation 0.")
    assert "on 12 held-out normal images" in message


def test_the_exported_graph_scores_as_the_checkpoint_with_slsg_map_left_out(selected, tmp_path):
    from slsg_train.data.images import to_tensor

    model, _ = selected
    rng = np.random.default_rng(11)
    frames = np.stack([_scene(rng), copy_part(_scene(rng), rng), remove_part(_scene(rng), rng)])
    onnx_map, onnx_score, torch_map, torch_score = export_and_serve(model, frames, tmp_path)
    with torch.no_grad():
        out = model(torch.stack([to_tensor(f) for f in frames]))
        component = model.component_check.log_odds(out.checks["component_check"], (SIZE, SIZE))
        fused = model.anomaly_log_odds(out)
    np.testing.assert_allclose(onnx_score, torch_score, atol=1e-4)
    np.testing.assert_allclose(onnx_map, torch_map, atol=1e-4)
    assert torch.equal(fused, component)  # the fused map is the component check's alone
    assert onnx_score[1:].min() > onnx_score[0]  # the extra and the missing part score above the normal scene


def test_too_few_held_out_images_leave_every_part_in_and_say_so(selected):
    from slsg_train.training.fusion import MIN_IMAGES, select_fusion

    model, _ = selected
    rng = np.random.default_rng(5)
    few = [_scene(rng) for _ in range(MIN_IMAGES - 1)]
    report = select_fusion(model, few, top_k_for_size(SIZE, SIZE))
    assert report["left_out"] == {} and "too few" in report["skipped"]
    assert fusion_messages(report) == [f"fusion not selected: {report['skipped']}"]
