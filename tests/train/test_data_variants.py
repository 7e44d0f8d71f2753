"""Data sets as users have them, end to end through `slsg train` and `slsg evaluate` on tiny generated data.

One tiny model is trained on an MVTec AD-style category (defect folders with any name, no validation
split, no ground_truth folder) and evaluated on it and on variants of it: masks missing, empty or
unreadable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, PngImagePlugin

from slsg_train.metrics import auroc

from support import run_slsg as slsg

SIZE = (40, 56)  # (H, W) of the generated images: non-square on purpose
DEFECT_TYPES = ("broken_large", "contamination")


def _texture(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A smooth grey-green surface with a little noise, uint8 HxWx3."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 30 * np.sin(xx / 5.0 + rng.uniform(0, 0.3)) + rng.normal(0, 4, (h, w))
    return np.clip(np.dstack([base, base + 20, base - 10]), 0, 255).astype(np.uint8)


def _defect_box(k: int, size: tuple[int, int] = SIZE) -> tuple[slice, slice]:
    h, w = size
    y, x = (5 + 7 * k) % (h - 12), (9 + 11 * k) % (w - 14)
    return slice(y, y + 10), slice(x, x + 12)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec_category(root: Path, name: str, masks: bool, seed: int = 0, train: int = 6) -> Path:
    """train/good, test/good and one folder per defect type (dark blobs); masks in ground_truth if asked."""
    rng = np.random.default_rng(seed)
    cat = root / name
    for i in range(train):
        _save(cat / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(3):
        _save(cat / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for t, defect in enumerate(DEFECT_TYPES):
        for i in range(3):
            image, box = _texture(rng), _defect_box(3 * t + i)
            image[box] = (20, 20, 20) if t == 0 else (200, 40, 160)
            _save(cat / "test" / defect / f"{i:03d}.png", image)
            if masks:
                mask = np.zeros(SIZE, np.uint8)
                mask[box] = 255
                _save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return cat


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained on a category with no validation split and no ground truth."""
    root = tmp_path_factory.mktemp("variants")
    data, run = root / "data", root / "run"
    make_mvtec_category(data, "bottle", masks=False)
    proc = slsg("train", "--data", str(data), "--category", "bottle", "--out", str(run), "--image-size", "64",
                "--steps", "2", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0",
                "--composition-steps", "4")
    return {"root": root, "data": data, "run": run, "checkpoint": run / "checkpoint.pt", "train_stdout": proc.stdout}


def _evaluate(trained: dict, data: Path, category: str, out: Path):
    proc = slsg("evaluate", "--checkpoint", str(trained["checkpoint"]), "--data", str(data), "--category", category,
                "--out", str(out))
    return proc, json.loads((out / "metrics.json").read_text()), json.loads((out / "scores.json").read_text())


def test_image_labels_only_give_image_metrics_and_unavailable_region_metrics(trained):
    out = trained["root"] / "eval_no_masks"
    proc, metrics, scores = _evaluate(trained, trained["data"], "bottle", out)
    assert metrics["counts"] == {"broken_large": 3, "contamination": 3, "good": 3}
    assert set(metrics["image_auroc"]) == {*DEFECT_TYPES, "mean", "all"}
    s = np.array([row["score"] for row in scores])
    anomalous = np.array([row["type"] != "good" for row in scores])
    assert metrics["image_auroc"]["all"] == pytest.approx(auroc(s, anomalous))
    for defect in DEFECT_TYPES:
        keep = np.array([row["type"] in ("good", defect) for row in scores])
        assert metrics["image_auroc"][defect] == pytest.approx(auroc(s[keep], anomalous[keep]))
    assert metrics["pixel_auroc"] is None and metrics["au_spro"] is None
    truth = metrics["ground_truth"]
    assert truth["anomalous_images"] == 6 and truth["with_masks"] == 0
    assert truth["region_metrics"].startswith("unavailable: no ground-truth masks")
    assert set(truth["left_out"]) == {f"{d}/{i:03d}" for d in DEFECT_TYPES for i in range(3)}
    report = (out / "report.md").read_text()
    assert "Pixel AUROC and AU-sPRO: unavailable: no ground-truth masks" in report
    assert f"| all | {metrics['image_auroc']['all']:.3f} |" in report and "| contamination |" in report
    assert "| logical |" not in report  # LOCO rows only for LOCO types
    assert "spro_curves.png" not in report and not (out / "spro_curves.png").exists()
    assert "pixel AUROC and AU-sPRO unavailable" in proc.stderr


def test_empty_unreadable_and_missing_masks_are_left_out_by_name(trained):
    data = trained["root"] / "masked"
    cat = make_mvtec_category(data, "bottle", masks=True, seed=1)
    gt = cat / "ground_truth"
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(gt / "broken_large" / "000_mask.png")  # empty
    (gt / "broken_large" / "001_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # unreadable
    (gt / "contamination" / "002_mask.png").unlink()  # missing
    out = trained["root"] / "eval_masked"
    proc, metrics, scores = _evaluate(trained, data, "bottle", out)
    left_out = metrics["ground_truth"]["left_out"]
    assert set(left_out) == {"broken_large/000", "broken_large/001", "contamination/002"}
    assert "mask is empty" in left_out["broken_large/000"] and "cannot read mask" in left_out["broken_large/001"]
    assert "mask missing" in left_out["contamination/002"]
    assert metrics["ground_truth"]["with_masks"] == 3 and metrics["ground_truth"]["region_metrics"] == "computed"
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert set(metrics["au_spro"]["0.05"]) == {*DEFECT_TYPES, "mean"}
    # the image metrics still count every image, masks or not
    assert metrics["counts"] == {"broken_large": 3, "contamination": 3, "good": 3} and len(scores) == 9
    by_defect = metrics["image_auroc_by_defect"]
    assert by_defect["broken_large"]["count"] == 1 and by_defect["contamination"]["count"] == 2
    for name in left_out:
        assert f"{name} left out of the region metrics" in proc.stderr
        assert f"- {name}: " in (out / "report.md").read_text()


def test_region_metrics_leave_out_images_without_masks(trained):
    """The masked images alone give the same region metrics as all images with the broken masks left out."""
    data = trained["root"] / "masked_subset"
    cat = make_mvtec_category(data, "bottle", masks=True, seed=1)
    shutil.copytree(cat, data / "subset")
    for defect, index in (("broken_large", "000"), ("contamination", "002")):
        (cat / "ground_truth" / defect / f"{index}_mask.png").unlink()
        (data / "subset" / "test" / defect / f"{index}.png").unlink()
        (data / "subset" / "ground_truth" / defect / f"{index}_mask.png").unlink()
    _, with_gaps, _ = _evaluate(trained, data, "bottle", trained["root"] / "eval_gaps")
    _, subset, _ = _evaluate(trained, data, "subset", trained["root"] / "eval_subset")
    assert with_gaps["pixel_auroc"] == pytest.approx(subset["pixel_auroc"])
    for limit, per_type in subset["au_spro"].items():
        assert with_gaps["au_spro"][limit] == pytest.approx(per_type)
    assert with_gaps["counts"]["broken_large"] == 3 and subset["counts"]["broken_large"] == 2


def test_category_without_validation_calibrates_on_held_out_training_images(trained):
    payload = torch.load(trained["checkpoint"], map_location="cpu", weights_only=False)
    split = payload["calibration_split"]  # train/good's last images, never trained on
    assert split["held_out_train"] >= 2 and split["held_out_train"] == split["scale_images"] + split["threshold_images"]
    assert payload["calibration"]["num_images"] == split["threshold_images"] >= 1
    assert "calibrated on" in trained["train_stdout"]


def test_images_of_different_sizes_get_maps_and_masks_at_their_own_size(trained):
    """Test images of three sizes in one category: each map is written, and compared, at its image's size."""
    data = trained["root"] / "sizes"
    cat = make_mvtec_category(data, "bottle", masks=True, seed=2)
    sizes = {"good/001": (52, 52), "broken_large/002": (33, 71), "contamination/000": (64, 40)}
    rng = np.random.default_rng(3)
    for name, size in sizes.items():
        defect, index = name.split("/")
        image = _texture(rng, size)
        box = _defect_box(1, size)
        if defect != "good":
            image[box] = (20, 20, 20)
            mask = np.zeros(size, np.uint8)
            mask[box] = 255
            _save(cat / "ground_truth" / defect / f"{index}_mask.png", mask)
        _save(cat / "test" / defect / f"{index}.png", image)
    out, maps = trained["root"] / "eval_sizes", trained["root"] / "maps_sizes"
    proc = slsg("evaluate", "--checkpoint", str(trained["checkpoint"]), "--data", str(data), "--category", "bottle",
                "--out", str(out), "--maps-dir", str(maps))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ground_truth"]["left_out"] == {} and 0.0 <= metrics["pixel_auroc"] <= 1.0
    for path in (maps / "bottle" / "test").rglob("*.tiff"):
        name = f"{path.parent.name}/{path.stem}"
        assert tifffile.imread(path).shape == sizes.get(name, SIZE), name
    assert len(list((maps / "bottle" / "test").rglob("*.tiff"))) == 9 and "warning" not in proc.stderr


# --------------------------------------------------------------------------- a non-square, 16-bit grey category

STRIP = (80, 200)  # (H, W) of the generated strips: 2.5:1, like 500x1250 parts


def _save_grey16(path: Path, rgb: np.ndarray, bits: int = 12) -> None:
    """The image's grey level as raw ``bits``-bit values in a 16-bit PNG with an sBIT chunk (a mono camera's)."""
    grey = rgb.mean(axis=2) * ((1 << bits) - 1) / 255.0
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([bits]))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(grey).astype(np.uint16)).save(path, pnginfo=info)


@pytest.fixture(scope="module")
def strip_model(tmp_path_factory) -> dict:
    """A tiny model trained with ``--image-size auto:96`` on 2.5:1 strips from a 12-bit mono camera
    (16-bit PNGs), exported to a model repository; its test images are 16-bit (a dent, a good one) and
    8-bit grey (a good one)."""
    root = tmp_path_factory.mktemp("strips")
    data, run, repo = root / "data", root / "run", root / "repo"
    cat = data / "strip"
    rng = np.random.default_rng(5)
    for i in range(6):
        _save_grey16(cat / "train" / "good" / f"{i:03d}.png", _texture(rng, STRIP))
    _save(cat / "test" / "good" / "000.png", _texture(rng, STRIP)[:, :, 0])  # 8-bit grey ('L')
    _save_grey16(cat / "test" / "good" / "001.png", _texture(rng, STRIP))
    broken = _texture(rng, STRIP)
    broken[20:50, 120:160] = 10
    _save_grey16(cat / "test" / "dent" / "000.png", broken)
    train = slsg("train", "--data", str(data), "--category", "strip", "--out", str(run), "--image-size", "auto:96",
                 "--steps", "2", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0",
                 "--composition-steps", "4")
    evaluate = slsg("evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data),
                    "--out", str(run / "eval"))
    export = slsg("export", "--checkpoint", str(run / "checkpoint.pt"), "--repository", str(repo), "--name", "strip")
    return {"data": data, "run": run, "repo": repo, "train": train, "evaluate": evaluate, "export": export}


def test_auto_input_size_keeps_the_aspect_ratio_and_says_so(strip_model):
    assert "input size auto: 160x64 (WxH) from the median aspect ratio 2.50 (W/H)" in strip_model["train"].stdout
    payload = torch.load(strip_model["run"] / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert payload["image_size"] == [64, 160] and list(payload["train_config"]["image_size"]) == [64, 160]
    assert payload["input_size_choice"]["size"] == [64, 160] and payload["input_size_choice"]["images"] == 6
    log = [json.loads(line) for line in (strip_model["run"] / "train_log.jsonl").read_text().splitlines()]
    assert [e["size"] for e in log if e["event"] == "input_size"] == [[64, 160]]


def test_16_bit_grey_images_train_and_evaluate(strip_model):
    payload = torch.load(strip_model["run"] / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert payload["image_colour"] == "greyscale"  # 12-bit frames read as grey, not as colour noise
    metrics = json.loads((strip_model["run"] / "eval" / "metrics.json").read_text())
    assert metrics["counts"] == {"dent": 1, "good": 2} and metrics["checkpoint"]["image_size"] == [64, 160]
    assert 0.0 <= metrics["image_auroc"]["dent"] <= 1.0 and metrics["pixel_auroc"] is None


def test_non_square_model_exports_and_runs_in_onnx_runtime(strip_model):
    import onnxruntime as ort

    from slsg.contract import MODEL_CARD_KEY, ModelCard, model_path
    from slsg.triton_config import load_config

    assert "verified against PyTorch" in strip_model["export"].stdout
    path = model_path(strip_model["repo"], "strip", 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json(session.get_modelmeta().custom_metadata_map[MODEL_CARD_KEY])
    assert (card.input_height, card.input_width) == (64, 160)
    assert session.get_inputs()[0].shape[1:] == [64, 160, 3]
    assert load_config(strip_model["repo"] / "strip" / "config.pbtxt").input[0].dims == [64, 160, 3]
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 160, 3), dtype=np.uint8)
    amap, score = session.run(["anomaly_map", "score"], {"image": frames})  # part_counts too, where it counts
    assert amap.shape == (2, 1, 64, 160) and score.shape == (2, 1)
    assert np.all((amap >= 0) & (amap <= 1)) and np.all((score >= 0) & (score <= 1))


def test_gateway_answers_what_evaluate_scored_for_the_same_16_bit_file(strip_model):
    """The gateway decodes the 16-bit PNG as training and evaluation read it: the same calibrated score."""
    import base64
    import io

    import httpx

    from slsg_gateway.server import BackgroundGateway
    from slsg_gateway.settings import Settings

    scores = {r["image"]: r["calibrated"]
              for r in json.loads((strip_model["run"] / "eval" / "scores.json").read_text())}
    settings = Settings(repository=strip_model["repo"], port=0, api_keys=["key"], admin_keys=["admin"])
    answers = {}
    with BackgroundGateway(settings) as gateway, httpx.Client(base_url=gateway.url, timeout=60,
                                                              headers={"X-API-Key": "key"}) as client:
        (info,) = client.get("/v1/models").json()["models"]
        for name in scores:
            data = (strip_model["data"] / "strip" / "test" / f"{name}.png").read_bytes()
            response = client.post("/v1/models/strip/inspect?heatmap=map", content=data,
                                   headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            answers[name] = response.json()
    assert (info["input_height"], info["input_width"]) == (64, 160)
    for name, body in answers.items():
        assert body["score"] == pytest.approx(scores[name], abs=1e-4), name
        assert (body["image_width"], body["image_height"]) == (200, 80)
        with Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"]))) as heatmap:
            assert heatmap.size == (200, 80)
