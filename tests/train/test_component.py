"""The component check (models/component.py) on toy scenes: coloured parts at random places, counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slsg.contract import INPUT_IMAGE, Calibration, ModelCard
from onnx_fixtures import export_and_serve
from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.models.component import ComponentCheck
from slsg_train.data.images import to_tensor

SIZE = 64
KINDS = {"red": ((210, 40, 40), 2, 5), "blue": ((40, 70, 210), 3, 4)}  # colour, count, half side (px)


def _scene(rng: np.random.Generator, counts: dict[str, int] | None = None,
           sizes: dict[str, int] | None = None) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """A grey floor with square parts of each kind at random places that do not touch; the parts' list."""
    gap = 2 * max([half for _, _, half in KINDS.values()] + list((sizes or {}).values())) + 4  # parts never touch
    while True:  # a new layout when the parts placed so far leave no room
        image = np.full((SIZE, SIZE, 3), 150, np.uint8) + rng.integers(0, 6, (SIZE, SIZE, 3), dtype=np.uint8)
        placed: list[tuple[str, int, int]] = []
        for name, (colour, count, half) in KINDS.items():
            half = (sizes or {}).get(name, half)
            for _ in range((counts or {}).get(name, count)):
                spots = [(int(y), int(x)) for y, x in rng.integers(half + 1, SIZE - half - 1, (100, 2))]
                free = [(y, x) for y, x in spots if all(abs(y - py) > gap or abs(x - px) > gap for _, py, px in placed)]
                if not free:
                    break
                y, x = free[0]
                image[y - half:y + half, x - half:x + half] = colour
                placed.append((name, y, x))
        if len(placed) == sum((counts or {}).get(name, count) for name, (_, count, _) in KINDS.items()):
            return image, placed


@pytest.fixture(scope="module")
def fitted() -> SLSG:
    from slsg_train.training.calibration import fit_checks

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SLSG(preset("default", patch_memory=False, composition_check=False, component_check=True,
                        component_clusters=4))
    normal = [_scene(rng)[0] for _ in range(16)]
    calib = [_scene(rng)[0] for _ in range(8)]
    report = fit_checks(model, normal, calib, top_k=top_k_for_size(SIZE, SIZE), progress=False)
    assert report["component_check"]["part_kinds"] == 2 and bool(model.component_check.fitted)
    return model.eval()


def _raw(model: SLSG, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the check's map [N, 1, h, w], its counts [N, K]) for uint8 images."""
    check: ComponentCheck = model.component_check
    with torch.no_grad():
        x = torch.stack([to_tensor(im) for im in images])
        maps = model.reference_encoder(x)
        return check(x, maps), check.counts(x, maps)


def test_segmentation_finds_the_parts_of_a_toy_image(fitted):
    check = fitted.component_check
    kinds = torch.nonzero(check.things).flatten()
    assert sorted(round(float(check.count_mean[k]), 2) for k in kinds) == [2.0, 3.0]
    rng = np.random.default_rng(5)
    for counts in ({"red": 2, "blue": 3}, {"red": 1, "blue": 4}, {"red": 3, "blue": 0}):
        image, placed = _scene(rng, counts)
        _, found = _raw(fitted, [image])
        # each part kind is a cluster of its own: the counts per kind are the scene's, in some order
        assert sorted(found[0, kinds].round().int().tolist()) == sorted(counts.values())
        with torch.no_grad():
            x = to_tensor(image)[None]
            segments = check.segment(check.descriptor(x, fitted.reference_encoder(x))).argmax(1)[0]
        for _name, y, x0 in placed:  # a part's centre lies in a part kind, and each kind has one cluster
            assert bool(check.things[segments[y, x0]])
        by_kind = {name: {int(segments[y, x0]) for n, y, x0 in placed if n == name} for name in counts if counts[name]}
        assert all(len(ids) == 1 for ids in by_kind.values()) and len(set().union(*by_kind.values())) == len(by_kind)


def test_counts_and_sizes_change_the_score_in_the_right_direction_and_the_map_marks_the_parts(fitted):
    rng = np.random.default_rng(7)
    k = top_k_for_size(SIZE, SIZE)
    check = fitted.component_check
    normal = [_scene(rng)[0] for _ in range(6)]
    extra, _ = _scene(rng, {"red": 3})
    missing, _ = _scene(rng, {"blue": 2})
    large, placed = _scene(rng, sizes={"red": 8})
    maps, _ = _raw(fitted, normal + [extra, missing, large])
    scores = check.image_raw(maps, (SIZE, SIZE), k)
    assert scores[6:].min() > scores[:6].max(), scores
    # the odd-sized part carries the large value, the normal-sized ones of the other kind do not
    deviation = maps[8, 0]
    red = [(y, x) for name, y, x in placed if name == "red"]
    blue = [(y, x) for name, y, x in placed if name == "blue"]
    assert min(float(deviation[y, x]) for y, x in red) > 3 * max(float(deviation[y, x]) for y, x in blue)
    assert float(deviation[2, 2]) == 0.0  # the floor is no part


def test_component_check_exports_and_the_served_answer_equals_the_checkpoint(fitted, tmp_path):
    rng = np.random.default_rng(11)
    frames = np.stack([_scene(rng)[0], _scene(rng, {"red": 3})[0], _scene(rng, {"blue": 1})[0]])
    onnx_map, onnx_score, torch_map, torch_score = export_and_serve(fitted, frames, tmp_path)
    np.testing.assert_allclose(onnx_score, torch_score, atol=1e-4)
    np.testing.assert_allclose(onnx_map, torch_map, atol=1e-4)
    assert onnx_score[1:].min() > onnx_score[0]  # the wrong counts score above the normal scene


def test_box_scenes_hold_fixed_counts_and_one_washer_shade_and_logical_defects_break_them():
    from slsg_train.data.synth import BOX, BOX_COUNTS, box_extra_part, box_missing_part, box_washer_mismatch

    def census(scene) -> dict[str, int]:
        kinds = [scene.attrs["parts"][e.name][0] for e in scene.elements if e.name.startswith("part:")]
        return {kind: kinds.count(kind) for kind in BOX_COUNTS}

    def washer_colours(scene) -> set:
        return {e.shapes[0].fill for e in scene.elements if e.name.startswith("part:washer")}

    for seed in range(5):
        rng = np.random.default_rng(seed)
        scene = BOX.build_scene(rng)
        assert census(scene) == BOX_COUNTS
        shades = washer_colours(scene)
        assert max(abs(a - b) for c1 in shades for c2 in shades for a, b in zip(c1, c2)) <= 8  # one shade (+ jitter)
        missing = BOX.build_scene(np.random.default_rng(seed))
        box_missing_part(missing, rng)
        assert sum(census(missing).values()) == sum(BOX_COUNTS.values()) - 1
        extra = BOX.build_scene(np.random.default_rng(seed))
        box_extra_part(extra, rng)
        assert sum(census(extra).values()) == sum(BOX_COUNTS.values()) + 1
        mismatch = BOX.build_scene(np.random.default_rng(seed))
        box_washer_mismatch(mismatch, rng)
        shades = washer_colours(mismatch)
        assert max(abs(a - b) for c1 in shades for c2 in shades for a, b in zip(c1, c2)) >= 18  # half the range


def _export_box(fitted: SLSG, tmp_path, frames: np.ndarray):
    from slsg_train.export.onnx_export import export_onnx

    card = ModelCard(name="box", category="box", backbone="efficientnet_lite0", input_height=SIZE,
                     input_width=SIZE, top_k=top_k_for_size(SIZE, SIZE),
                     calibration=Calibration(raw_threshold=0.8, score_min=0.5), project_version="test")
    return export_onnx(fitted, card, tmp_path / "box" / "1" / "model.onnx", verify_images=list(frames))


def test_exported_part_counts_equal_the_checkpoints_counts_and_the_card_lists_the_kinds(fitted, tmp_path):
    import onnxruntime as ort

    from slsg.contract import MODEL_CARD_KEY, OUTPUT_PART_COUNTS
    from slsg.triton_config import parse_config, production_config

    rng = np.random.default_rng(13)
    frames = np.stack([_scene(rng)[0], _scene(rng, {"red": 3})[0], _scene(rng, {"blue": 1})[0],
                       _scene(rng, {"red": 0, "blue": 5})[0]])
    result = _export_box(fitted, tmp_path, frames)
    kinds = result.card.part_kinds
    # expected counts from the normal scenes (2 red, 3 blue), named by their colour, no slack: counts never vary
    assert sorted((k.expected, k.name.split("(")[1]) for k in kinds) == [(2, "red)"), (3, "blue)")]
    assert [k.tolerance for k in kinds] == [0, 0]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert ModelCard.from_json(session.get_modelmeta().custom_metadata_map[MODEL_CARD_KEY]) == result.card
    (onnx_counts,) = session.run([OUTPUT_PART_COUNTS], {INPUT_IMAGE: frames})
    _, counts = _raw(fitted, list(frames))
    columns = fitted.component_check.part_columns()
    np.testing.assert_array_equal(onnx_counts, counts[:, columns].numpy())
    by_colour = {k.name.split("(")[1][:-1]: i for i, k in enumerate(kinds)}
    assert onnx_counts[:, by_colour["red"]].tolist() == [2, 3, 2, 0]
    assert onnx_counts[:, by_colour["blue"]].tolist() == [3, 3, 1, 5]
    config = parse_config(production_config("box", result.card))
    assert [(o.name, list(o.dims)) for o in config.output][-1] == (OUTPUT_PART_COUNTS, [-1])


def test_the_gateway_explains_an_extra_part_and_not_a_normal_scene(fitted, tmp_path):
    import io

    import httpx
    from PIL import Image

    from slsg_gateway.server import BackgroundGateway
    from slsg_gateway.settings import Settings

    rng = np.random.default_rng(17)
    normal, extra = _scene(rng)[0], _scene(rng, {"red": 3})[0]
    result = _export_box(fitted, tmp_path / "repository", np.stack([normal, extra]))
    red = next(k.name for k in result.card.part_kinds if k.name.endswith("(red)"))

    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    settings = Settings(repository=tmp_path / "repository", port=0, records="off")
    with BackgroundGateway(settings) as gw:
        answers = [httpx.post(f"{gw.url}/v1/models/box/inspect", files={"file": ("f.png", png(im), "image/png")},
                              timeout=30).json() for im in (normal, extra)]
    assert answers[0]["explanations"] == []
    assert answers[1]["explanations"] == [{"part": red, "found": 3, "expected": 2}]


def _varying(rng: np.random.Generator, red: int) -> np.ndarray:
    """A scene with ``red`` steady red parts and a blue kind that normal images do not hold steady: none,
    one or two blue parts (one most often), of sizes from 4 to 12 px."""
    blue = int(rng.choice([0, 1, 1, 1, 2]))
    return _scene(rng, {"red": red, "blue": blue}, {"blue": int(rng.integers(2, 7))})[0]


def _fit_on(images: list[np.ndarray], **config) -> tuple[SLSG, dict]:
    from slsg_train.training.calibration import fit_checks

    torch.manual_seed(0)
    model = SLSG(preset("default", composition_check=False, component_check=True, **config))
    report = fit_checks(model, images[:-8], images[-8:], top_k=top_k_for_size(SIZE, SIZE), progress=False)
    return model.eval(), report


def test_a_kind_whose_count_and_size_vary_on_normal_images_is_dropped_and_the_steady_kind_kept():
    rng = np.random.default_rng(3)
    model, report = _fit_on([_varying(rng, red=2) for _ in range(32)], patch_memory=False, component_clusters=4)
    check: ComponentCheck = model.component_check
    assert report["component_check"]["part_kinds"] == 1 and len(report["component_check"]["dropped"]) == 1
    assert "most common count on" in next(iter(report["component_check"]["dropped"].values()))
    (kind,) = check.part_columns()
    assert check.colour_name(kind) == "red" and report["component_check"]["rules"] == [["count", "area", "colour"]]
    # the blue parts, however many and large, carry no evidence; a third red part does
    scenes = [_scene(rng, {"red": 2, "blue": n}, {"blue": half}) for n, half in ((2, 5), (3, 2))]
    scenes.append(_scene(rng, {"red": 3, "blue": 1}))
    maps, _ = _raw(model, [image for image, _ in scenes])
    blue = [float(maps[i, 0, y, x]) for i, (_, placed) in enumerate(scenes) for name, y, x in placed if name == "blue"]
    red = [float(maps[2, 0, y, x]) for name, y, x in scenes[2][1] if name == "red"]
    assert len(blue) == 6 and max(blue) == 0.0 and min(red) > 0.0, (blue, red)
    log_odds = check.log_odds(maps, (SIZE, SIZE))
    assert float(log_odds[2].max()) > -10 and float(log_odds[2, 0, 2, 2]) < -10  # off the parts: no evidence


def test_a_category_without_steady_parts_leaves_the_check_out_and_says_why():
    from slsg_train.training.calibration import left_out_messages

    rng = np.random.default_rng(4)
    model, report = _fit_on([_varying(rng, red=0) for _ in range(32)], component_clusters=3)
    reason = report["left_out"]["component_check"]
    assert "nothing to count" in reason or "none of the" in reason, reason
    assert model.component_check is None and not model.config.component_check
    assert bool(model.patch_memory.fitted) and model.reference_encoder is not None  # the other check stays
    assert left_out_messages(report) == [f"component check left out: {reason}"]
    with torch.no_grad():  # and the model still scores, without it
        assert set(model(to_tensor(_varying(rng, red=0))[None]).checks) == {"patch_memory"}
