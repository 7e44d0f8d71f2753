"""The LOCO reader on tiny data sets written here: the three ground-truth layouts and every error."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from slsg_train.data.loco import DataSetError, DefectConfig, LocoCategory, list_categories, load_rgb

H, W = 24, 40  # non-square on purpose: catches (H, W) / (W, H) mix-ups
CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 10, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 20, "saturation_threshold": 50, "relative_saturation": False},
    {"defect_name": "scratch", "pixel_value": 30, "saturation_threshold": 0.5, "relative_saturation": True},
]


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(value: int, box: tuple[int, int, int, int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def _normal_splits(cat: Path, validation: bool = True) -> None:
    for i in range(2):
        _png(cat / "train" / "good" / f"{i:03d}.png", _image(i))
    if validation:
        _png(cat / "validation" / "good" / "000.png", _image(10))
    _png(cat / "test" / "good" / "000.png", _image(20))


def make_loco(root: Path, name: str = "box") -> Path:
    """LOCO layout: one mask folder per anomalous image, one mask per defect, defects_config.json."""
    cat = root / name
    _normal_splits(cat)
    _png(cat / "test" / "logical_anomalies" / "000.png", _image(30))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", _mask(10, (0, 5, 0, 8)))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", _mask(20, (10, 20, 10, 30)))
    _png(cat / "test" / "structural_anomalies" / "000.png", _image(40))
    _png(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", _mask(30, (3, 4, 3, 9)))
    (cat / "defects_config.json").write_text(json.dumps(CONFIG))
    return cat


def make_flat(root: Path, types: tuple[str, ...], validation: bool, name: str = "flat") -> Path:
    """Flat layout (the seed's README, MVTec AD): ground_truth/<type>/000_mask.png, no defects_config.json."""
    cat = root / name
    _normal_splits(cat, validation)
    for k, anomaly_type in enumerate(types):
        _png(cat / "test" / anomaly_type / "000.png", _image(50 + k))
        _png(cat / "ground_truth" / anomaly_type / "000_mask.png", _mask(1 + k * 254, (k, k + 6, 2, 12)))
    return cat


def test_loco_layout_round_trip(tmp_path):
    cat = make_loco(tmp_path)
    data = LocoCategory(tmp_path, "box")
    assert data.layout == "loco" and data.name == "box" and data.root == tmp_path
    assert [d.pixel_value for d in data.defects] == [10, 20, 30]
    assert [p.name for p in data.train_paths] == ["000.png", "001.png"] and len(data.validation_paths) == 1
    samples = data.test_samples()
    assert [(s.anomaly_type, s.index) for s in samples] == [
        ("good", "000"), ("logical_anomalies", "000"), ("structural_anomalies", "000")]
    good, logical, structural = samples
    assert not good.is_anomalous and good.masks == () and good.size == (H, W)
    assert logical.is_anomalous and [m.defect.defect_name for m in logical.masks] == ["missing_part", "extra_part"]
    first, second = (m.load() for m in logical.masks)
    assert first.dtype == bool and first.shape == (H, W) and first.sum() == 5 * 8 and second.sum() == 10 * 20
    assert structural.masks[0].defect.defect_name == "scratch" and structural.masks[0].load().sum() == 6
    np.testing.assert_array_equal(logical.load_image(), np.asarray(Image.open(cat / "test/logical_anomalies/000.png")))
    assert [s.anomaly_type for s in data.test_samples(["structural_anomalies", "good"])] == [
        "good", "structural_anomalies"]
    assert list_categories(tmp_path) == ["box"]


def test_saturation_area_relative_and_absolute():
    assert DefectConfig("a", 1, 0.5, True).saturation_area(300) == pytest.approx(150)
    assert DefectConfig("b", 2, 50, False).saturation_area(300) == 50
    assert DefectConfig("b", 2, 50, False).saturation_area(20) == 20  # capped at the defect's area


def test_flat_layout_of_the_seed_readme(tmp_path):
    make_flat(tmp_path, ("logical_anomalies", "structural_anomalies"), validation=True)
    data = LocoCategory(tmp_path, "flat")
    assert data.layout == "flat" and len(data.validation_paths) == 1
    assert data.defects == [DefectConfig("logical_anomalies", 255, 1.0, True),
                            DefectConfig("structural_anomalies", 255, 1.0, True)]
    logical = data.test_samples(["logical_anomalies"])[0]
    (mask,) = logical.masks
    assert mask.path.name == "000_mask.png" and mask.load().sum() == 6 * 10  # value 1, still defective


def test_mvtec_ad_layout_with_arbitrary_defect_folders(tmp_path):
    make_flat(tmp_path, ("crack", "scratch", "color"), validation=False, name="bottle")
    data = LocoCategory(tmp_path, "bottle")
    assert data.validation_paths == [] and data.test_types == ["color", "crack", "good", "scratch"]
    assert [d.defect_name for d in data.defects] == ["color", "crack", "scratch"]
    samples = data.test_samples()
    assert [s.anomaly_type for s in samples] == ["color", "crack", "good", "scratch"]
    for s in samples:
        assert s.is_anomalous == (s.anomaly_type != "good")
        for m in s.masks:
            assert m.defect.defect_name == s.anomaly_type and m.load().shape == s.size and m.load().any()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_load_rgb_converts_to_uint8_rgb(tmp_path, mode):
    grey = np.linspace(0, 255, H * W).reshape(H, W).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)  # full 16-bit range
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 7)]))
    else:
        img = Image.fromarray(grey).convert(mode)
    img.save(tmp_path / "x.png")
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    assert np.abs(rgb[:, :, 1].astype(int) - grey).max() <= 1


def _frame_file(tmp_path: Path, kind: str) -> Path:
    grey = np.linspace(0, 255, H * W).reshape(H, W).astype(np.uint8)
    path, info = tmp_path / f"{kind}.png", None
    if kind == "16-bit":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif kind == "12-bit+sBIT":  # a mono camera's raw 12-bit values, the PNG saying so
        img = Image.fromarray(grey.astype(np.uint16) * 16)
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([12]))
    elif kind == "RGBA":
        img = Image.fromarray(np.dstack([grey, 255 - grey, grey // 2, np.full_like(grey, 7)]))
    else:
        img = Image.fromarray(grey).convert(kind)
    img.save(path, **({"pnginfo": info} if info else {}))
    return path


@pytest.mark.parametrize("kind", ["L", "P", "RGBA", "16-bit", "12-bit+sBIT"])
def test_data_set_images_decode_as_the_gateway_decodes_frames(tmp_path, kind):
    """One decoding rule (slsg.image_modes) on both sides: a model sees in service what it saw in training."""
    from slsg_gateway.imaging import decode_frame

    path = _frame_file(tmp_path, kind)
    training_side = load_rgb(path)
    gateway_side = decode_frame(path.read_bytes(), (H, W), max_pixels=10**6).pixels
    np.testing.assert_array_equal(training_side, gateway_side)
    assert training_side.dtype == np.uint8 and training_side.shape == (H, W, 3) and training_side.max() >= 250


def test_unsupported_image_mode_is_a_data_set_error(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (W, H)).save(path)
    with pytest.raises(DataSetError, match="lab.tif: cannot use image") as info:
        load_rgb(path)
    assert "'LAB'" in str(info.value)


def test_data_hash_follows_training_bytes_not_location(tmp_path):
    make_loco(tmp_path / "a")
    first = LocoCategory(tmp_path / "a", "box").data_hash()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert LocoCategory(tmp_path / "b", "box").data_hash() == first
    _png(tmp_path / "b" / "box" / "validation" / "good" / "000.png", _image(99))
    assert LocoCategory(tmp_path / "b", "box").data_hash() != first
    (tmp_path / "a/box/test/good/000.png").write_bytes(b"")  # test images do not enter the hash
    assert LocoCategory(tmp_path / "a", "box").data_hash() == first


# --------------------------------------------------------------------------- errors


def _error(tmp_path, build, category="box", samples=False) -> str:
    cat = make_loco(tmp_path)
    build(cat)
    with pytest.raises(DataSetError) as info:
        data = LocoCategory(tmp_path, category)
        if samples:
            data.test_samples()
    return str(info.value)


def test_error_wrong_root(tmp_path):
    with pytest.raises(DataSetError, match="data set root not found") as info:
        LocoCategory(tmp_path / "nowhere", "box")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_error_missing_category_lists_existing(tmp_path):
    message = _error(tmp_path, lambda cat: make_loco(cat.parent, "bag"), category="bottle")
    assert str(tmp_path / "bottle") in message and "bag, box" in message


def test_error_missing_split_folder(tmp_path):
    message = _error(tmp_path, lambda cat: shutil.rmtree(cat / "validation"))
    assert str(tmp_path / "box" / "validation") in message and "split folder missing" in message


def test_error_split_without_images(tmp_path):
    def empty_train(cat):
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
    message = _error(tmp_path, empty_train)
    assert str(tmp_path / "box" / "train" / "good") in message and "no images" in message


def test_error_corrupt_image(tmp_path):
    bad = tmp_path / "box" / "test" / "logical_anomalies" / "000.png"
    message = _error(tmp_path, lambda cat: bad.write_bytes(b"not a png"), samples=True)
    assert str(bad) in message and "cannot read image" in message
    with pytest.raises(DataSetError, match="cannot read image") as info:
        load_rgb(bad)
    assert str(bad) in str(info.value)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((tmp_path / "box/train/good/000.png").read_bytes()[:80])
    with pytest.raises(DataSetError, match="cut.png"):
        load_rgb(truncated)


def test_missing_mask_folder_is_reported_not_an_error(tmp_path):
    folder = tmp_path / "box" / "ground_truth" / "structural_anomalies" / "000"
    make_loco(tmp_path)
    shutil.rmtree(folder)
    samples = {s.name: s for s in LocoCategory(tmp_path, "box").test_samples()}
    structural = samples["structural_anomalies/000"]
    assert structural.masks == () and not structural.has_ground_truth
    assert str(folder) in structural.ground_truth_issue and "mask folder missing" in structural.ground_truth_issue
    assert samples["logical_anomalies/000"].has_ground_truth and samples["good/000"].has_ground_truth


def test_error_mask_size_differs(tmp_path):
    mask = tmp_path / "box" / "ground_truth" / "structural_anomalies" / "000" / "000.png"
    message = _error(tmp_path, lambda cat: _png(mask, _mask(30, (0, 3, 0, 3), (H, W + 1))), samples=True)
    assert str(mask) in message and f"differs from its image's {(H, W)}" in message


def test_error_mask_value_not_in_config(tmp_path):
    mask = tmp_path / "box" / "ground_truth" / "logical_anomalies" / "000" / "001.png"
    message = _error(tmp_path, lambda cat: _png(mask, _mask(77, (0, 3, 0, 3))), samples=True)
    assert str(mask) in message and "mask value 77 is not in" in message and "defects_config.json" in message


def test_flat_mask_missing_is_reported_by_name(tmp_path):
    cat = make_flat(tmp_path, ("crack", "hole"), validation=False)
    (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
    crack, good, hole = LocoCategory(tmp_path, "flat").test_samples()
    assert crack.masks == () and str(cat / "ground_truth" / "crack" / "000_mask.png") in crack.ground_truth_issue
    assert "mask missing" in crack.ground_truth_issue and crack.is_anomalous
    assert good.ground_truth_issue is None and hole.ground_truth_issue is None and len(hole.masks) == 1


def test_category_without_ground_truth_has_image_labels_only(tmp_path):
    """MVTec AD as some users have it: test/<defect>/ folders, no ground_truth folder, no validation split."""
    cat = make_flat(tmp_path, ("broken_large", "contamination"), validation=False, name="bottle")
    shutil.rmtree(cat / "ground_truth")
    data = LocoCategory(tmp_path, "bottle")
    assert data.layout == "flat" and not data.has_ground_truth_folder and data.validation_paths == []
    samples = data.test_samples()
    assert [(s.anomaly_type, s.is_anomalous, s.masks) for s in samples] == [
        ("broken_large", True, ()), ("contamination", True, ()), ("good", False, ())]
    for s in samples[:2]:
        assert not s.has_ground_truth and "no ground truth" in s.ground_truth_issue
        assert str(cat / "ground_truth") in s.ground_truth_issue


@pytest.mark.parametrize("layout", ["flat", "loco"])
@pytest.mark.parametrize("problem", ["empty", "unreadable"])
def test_empty_or_unreadable_mask_is_reported_by_name(tmp_path, layout, problem):
    if layout == "flat":
        cat = make_flat(tmp_path, ("crack",), validation=False, name="box")
        mask, name = cat / "ground_truth" / "crack" / "000_mask.png", "crack/000"
    else:
        cat = make_loco(tmp_path)
        mask, name = cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", "logical_anomalies/000"
    if problem == "empty":
        _png(mask, np.zeros((H, W), np.uint8))
    else:
        mask.write_bytes(b"\x89PNG not really")
    samples = {s.name: s for s in LocoCategory(tmp_path, "box").test_samples()}
    broken = samples[name]
    assert broken.masks == () and not broken.has_ground_truth and str(mask) in broken.ground_truth_issue
    assert ("mask is empty" if problem == "empty" else "cannot read mask") in broken.ground_truth_issue
    assert [s.name for s in samples.values() if not s.has_ground_truth] == [name]


def test_error_unknown_test_type(tmp_path):
    make_loco(tmp_path)
    with pytest.raises(DataSetError, match=r"no test type\(s\) \['cracks'\]"):
        LocoCategory(tmp_path, "box").test_samples(["cracks"])


@pytest.mark.parametrize("text, problem", [
    ("{not json", "malformed defects config"),
    (json.dumps({"defect_name": "x"}), "expected a non-empty JSON list"),
    (json.dumps([dict(CONFIG[0], pixel_value="10")]), "pixel_value='10'"),
    (json.dumps([dict(CONFIG[0], relative_saturation=1)]), "relative_saturation=1"),
    (json.dumps([dict(CONFIG[0], saturation_threshold=1.5)]), "out of range"),
    (json.dumps([CONFIG[0], dict(CONFIG[1], pixel_value=10)]), "pixel_value must be unique"),
])
def test_error_malformed_defects_config(tmp_path, text, problem):
    message = _error(tmp_path, lambda cat: (cat / "defects_config.json").write_text(text))
    assert str(tmp_path / "box" / "defects_config.json") in message and problem in message
