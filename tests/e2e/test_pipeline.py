"""The training side end to end on tiny synthetic data: train -> evaluate -> calibrate -> export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tifffile
import torch
from PIL import Image

from slsg.contract import MODEL_CARD_KEY, ModelCard, list_versions
from slsg.triton_config import load_config

from support import run_slsg as slsg




@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    data, run = root / "data", root / "run"
    slsg("synth", str(data), "--categories", "tray", "--image-size", "96x64", "--train", "8", "--validation", "4",
         "--test-good", "3", "--test-logical", "3", "--test-structural", "3")
    slsg("train", "--data", str(data), "--category", "tray", "--out", str(run), "--image-size", "64",
         "--steps", "3", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0", "--composition-steps", "10")
    return {"root": root, "data": data, "run": run, "checkpoint": run / "checkpoint.pt"}


def test_evaluate_writes_metrics_report_figures_and_official_maps(trained):
    out, maps = trained["run"] / "eval", trained["root"] / "maps"
    proc = slsg("evaluate", "--checkpoint", str(trained["checkpoint"]), "--data", str(trained["data"]),
                "--out", str(out), "--maps-dir", str(maps))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["category"] == "tray"
    assert metrics["counts"] == {"good": 3, "logical_anomalies": 3, "structural_anomalies": 3}
    for key in ("logical", "structural", "mean"):
        assert 0.0 <= metrics["image_auroc"][key] <= 1.0
    assert set(metrics["au_spro"]) == {"0.05", "0.1", "0.3", "1.0"}
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["threshold"]["raw"] > 0
    # 4 validation images and 1 held out of the 8 training images: 2 fit the checks' scales, 3 the
    # threshold, which is above all of them
    assert metrics["threshold"]["calibration_images"] == 3 and metrics["threshold"]["scale_images"] == 2
    assert metrics["threshold"]["expected_fpr"] == pytest.approx(1 / 4)
    assert metrics["threshold"]["fpr_upper_90"] == pytest.approx(1 - 0.1 ** (1 / 3))
    alarms = metrics["false_alarms"]  # observed on the 3 good test images beside the promise
    flagged_good = sum(s["score"] >= metrics["threshold"]["raw"] for s in json.loads((out / "scores.json").read_text())
                       if s["type"] == "good")
    assert (alarms["good_images"], alarms["flagged"]) == (3, flagged_good) and alarms["promise_by_construction"]
    assert alarms["expected_fpr"] == metrics["threshold"]["expected_fpr"] and 0 <= alarms["p_value_more"] <= 1
    report = (out / "report.md").read_text()
    assert f"{metrics['image_auroc']['mean']:.3f}" in report and "structural" in proc.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 9 and {s["image"] for s in scores} >= {"good/000", "logical_anomalies/000"}
    # the calibrated score, what the exported model answers, decides as the raw threshold does
    raw_threshold = metrics["threshold"]["raw"]
    assert all(0 <= s["calibrated"] <= 1 and (s["calibrated"] >= 0.5) == (s["score"] >= raw_threshold) for s in scores)
    by_defect = metrics["image_auroc_by_defect"]
    named = {d for s in scores for d in s["defects"]}
    assert set(by_defect) == named and all(not s["defects"] for s in scores if s["type"] == "good")
    assert sum(v["count"] for v in by_defect.values()) >= 6  # 6 anomalous images, some with two defects
    for name, value in by_defect.items():
        assert 0.0 <= value["auroc"] <= 1.0 and f"| {name} |" in report
    for name in ("roc_curves.png", "score_histograms.png", "spro_curves.png", "heatmaps.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 200
    tiffs = sorted((maps / "tray" / "test").rglob("*.tiff"))
    assert len(tiffs) == 9
    amap = tifffile.imread(tiffs[0])
    assert amap.dtype == np.float32 and amap.shape == (64, 96)  # the original (H, W), not the model's 64x64


def test_calibrate_changes_the_threshold_with_the_target_rate(trained, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(trained["checkpoint"].read_bytes())
    before = torch.load(ckpt, weights_only=False)["calibration"]["raw_threshold"]
    proc = slsg("calibrate", "--checkpoint", str(ckpt), "--fpr", "0.5")
    after = torch.load(ckpt, weights_only=False)["calibration"]
    assert after["target_fpr"] == 0.5 and after["raw_threshold"] <= before
    assert "warning" not in proc.stderr  # 1 of 3 threshold images above it: 2 / 4 on average, within 0.5
    proc = slsg("calibrate", "--checkpoint", str(ckpt), "--fpr", "0.01")
    assert "3 normal threshold images (and 2 more set the reference checks' scales) cannot pin a 1.00% false-positive" \
        in proc.stderr
    assert "at least 99" in proc.stderr and "25.00%" in proc.stderr


def test_calibrate_refuses_check_flags_naming_slsg_checks(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"  # never read: the flags are refused first
    for flags in (("--patch-memory", "off"), ("--composition-check", "on", "--composition-steps", "3"), ("--global-branch",)):
        proc = slsg("calibrate", "--checkpoint", str(ckpt), *flags, check=False)
        assert proc.returncode == 2 and "re-chooses the threshold only" in proc.stderr
        assert f"`slsg checks --checkpoint {ckpt} {flags[0]}" in proc.stderr
    assert not ckpt.exists()


def test_export_writes_a_verified_versioned_model(trained, tmp_path):
    repo = tmp_path / "repo"
    slsg("evaluate", "--checkpoint", str(trained["checkpoint"]), "--data", str(trained["data"]),
         "--out", str(trained["run"] / "eval"))
    proc = slsg("export", "--checkpoint", str(trained["checkpoint"]), "--repository", str(repo), "--name", "tray")
    assert "verified against PyTorch" in proc.stdout
    slsg("export", "--checkpoint", str(trained["checkpoint"]), "--repository", str(repo), "--name", "tray")
    assert list_versions(repo, "tray") == [1, 2]
    cfg = load_config(repo / "tray" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and cfg.input[0].dims == [64, 64, 3]

    sess = ort.InferenceSession(str(repo / "tray" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json(sess.get_modelmeta().custom_metadata_map[MODEL_CARD_KEY])
    assert card.category == "tray" and card.metrics["category"] == "tray" and card.training_data_hash
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    amap, score = sess.run(["anomaly_map", "score"], {"image": frames})  # part_counts too, where it counts parts
    assert amap.shape == (3, 1, 64, 64) and score.shape == (3, 1)
    assert np.all((score >= 0) & (score <= 1)) and np.all((amap >= 0) & (amap <= 1))
    # on the test images it answers the calibrated scores the evaluation reported
    from slsg_train.data.images import resize_rgb

    rows = json.loads((trained["run"] / "eval" / "scores.json").read_text())
    frames = np.stack([resize_rgb(np.asarray(Image.open(trained["data"] / "tray" / "test" / f"{r['image']}.png")
                                             .convert("RGB")), (64, 64)) for r in rows])
    amap, score = sess.run(["anomaly_map", "score"], {"image": frames})  # part_counts too, where it counts parts
    np.testing.assert_allclose(score[:, 0], [r["calibrated"] for r in rows], atol=1e-4)
    # its map is the checkpoint's map on the score's scale, and the card's pixel threshold moved with it:
    # the regions are those of the probability map above the checkpoint's own pixel threshold
    from slsg_gateway.regions import find_regions
    from slsg_train.export.onnx_export import score_gain
    from slsg_train.inference import load_model, predict

    loaded = load_model(trained["checkpoint"])
    assert card.anomaly_map_scale == "calibrated" and card.calibration.pixel_threshold == 0.5
    assert loaded.calibration.pixel_threshold == loaded.calibration.raw_threshold != 0.5
    prediction = predict(loaded.model, list(frames), loaded.top_k)
    on_score_scale = loaded.calibration.calibrated_score(prediction.map_log_odds)
    np.testing.assert_allclose(amap[:, 0], on_score_scale, atol=1e-4 * score_gain(loaded.calibration))
    boxes = lambda regions: sorted((r.x0, r.y0, r.x1, r.y1, r.area) for r in regions)  # noqa: E731 (peaks may tie)
    found = [boxes(find_regions(m, card.calibration.pixel_threshold, (64, 64))) for m in on_score_scale]
    assert found == [boxes(find_regions(m, loaded.calibration.pixel_threshold, (64, 64))) for m in prediction.maps]
    assert any(found) and not all(found)  # regions on some images, not on all


def test_export_refuses_to_overwrite_a_version_and_keeps_it(trained, tmp_path):
    repo = tmp_path / "repo"
    slsg("export", "--checkpoint", str(trained["checkpoint"]), "--repository", str(repo), "--name", "tray")
    model = repo / "tray" / "1" / "model.onnx"
    before = model.read_bytes()
    proc = slsg("export", "--checkpoint", str(trained["checkpoint"]), "--repository", str(repo), "--name", "tray",
                "--version", "1", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert model.read_bytes() == before


def test_checks_are_scaled_on_other_held_out_images_than_the_threshold(trained):
    from slsg_train.data.loco import LocoCategory
    from slsg_train.inference import load_model, predict
    from slsg_train.models.reference import fitted_scale
    from slsg_train.training.calibration import split_for_calibration, threshold_for_fpr
    from slsg_train.data.images import load_resized, to_tensor

    loaded = load_model(trained["checkpoint"])
    record = loaded.checkpoint.calibration_split
    split = split_for_calibration(LocoCategory(trained["data"], "tray"), 0.01, has_checks=True,
                                  held_out_train=record["held_out_train"])
    assert record == split.summary() and not set(split.scale) & set(split.threshold)
    assert loaded.calibration.scale_images == len(split.scale) and loaded.calibration.num_images == len(split.threshold)

    def patch_scale(paths):  # the patch memory's scale as calibration fits it, on these images
        images = load_resized(paths, loaded.image_size)
        model, patch = loaded.model, loaded.model.patch_memory
        with torch.no_grad():
            x = torch.stack([to_tensor(im) for im in images])
            raw = patch.image_raw(patch(x, model.reference_encoder(x)), loaded.image_size, loaded.top_k)
            fitted = {check.name: bool(check.fitted) for check in model.checks}
            for check in model.checks:  # the paper's local score, as the map checks are scaled against
                check.fitted.fill_(False)
            local = predict(model, images, loaded.top_k).scores
            for check in model.checks:
                check.fitted.fill_(fitted[check.name])
        return fitted_scale(raw.double().numpy(), local)

    stored = loaded.model.patch_memory.scale
    torch.testing.assert_close(stored, patch_scale(split.scale).float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stored, patch_scale(split.threshold).float(), rtol=1e-3)
    # the threshold is set on the threshold images alone, with the checks so scaled
    scores = predict(loaded.model, load_resized(split.threshold, loaded.image_size), loaded.top_k).scores
    assert loaded.calibration.raw_threshold == pytest.approx(threshold_for_fpr(scores, 0.01), rel=1e-6)


def test_export_rejects_bad_names_and_uncalibrated_checkpoints(trained, tmp_path):
    proc = slsg("export", "--checkpoint", str(trained["checkpoint"]), "--repository", str(tmp_path),
                "--name", "../evil", check=False)
    assert proc.returncode == 2 and "invalid model name" in proc.stderr
    payload = torch.load(trained["checkpoint"], weights_only=False)
    payload["calibration"], payload["stage"] = None, "train"
    uncalibrated = tmp_path / "uncalibrated.pt"
    torch.save(payload, uncalibrated)
    proc = slsg("export", "--checkpoint", str(uncalibrated), "--repository", str(tmp_path / "repo"),
                "--name", "tray", check=False)
    assert proc.returncode == 2 and "no calibration" in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_info_prints_size_and_cost(trained):
    info = json.loads(slsg("info", "--checkpoint", str(trained["checkpoint"]), "--json").stdout)
    assert info["backbone"] == "efficientnet_lite0" and info["image_size"] == [64, 64]
    assert info["parameters"]["total"] > info["parameters"]["trainable"] > 0 and info["gflop_per_image"] > 0


def test_evaluate_all_categories_prints_a_summary_with_a_mean_row(trained, tmp_path):
    runs = tmp_path / "runs"
    (runs / "tray").mkdir(parents=True)
    (runs / "tray" / "checkpoint.pt").symlink_to(trained["checkpoint"])
    proc = slsg("evaluate", "--all-categories", "--checkpoint", str(runs), "--data", str(trained["data"]),
                "--out", str(tmp_path / "eval"))
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "tray" in summary and "mean" in summary.lower() and summary.strip() in proc.stdout
    assert (tmp_path / "eval" / "tray" / "metrics.json").is_file()


def test_train_reads_a_settings_file_and_flags_win(trained, tmp_path):
    settings = tmp_path / "tray.yaml"
    settings.write_text("steps: 50\noptim:\n  lr: 0.01\nsimulation:\n  logical_probability: 0.0\n"
                        "  logical_grids: [[2, 3]]\n")
    run = tmp_path / "run"
    slsg("train", "--data", str(trained["data"]), "--category", "tray", "--out", str(run), "--image-size", "64",
         "--steps", "2", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0", "--config", str(settings),
         "--global-branch", "--composition-steps", "5")
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    config = payload["train_config"]
    assert config["steps"] == 2  # the flag beat the file
    assert config["optim"]["lr"] == 0.01 and config["optim"]["momentum"] == 0.9  # merged, not replaced
    assert config["simulation"]["logical_probability"] == 0.0
    assert config["simulation"]["logical_grids"] == [[2, 3]]
    # --global-branch (and the preset's patch memory and composition check): built, fitted after
    # training and before calibration, logged; one frozen reference encoder serves them all
    # the stored settings are resolved: the preset's network fields with the file's and flags' on top
    assert config["model"]["global_branch"] is True and config["model"]["composition_steps"] == 5
    assert config["model"]["backbone"] == payload["model_config"]["backbone"] == "efficientnet_lite0"
    assert payload["model_config"]["global_branch"] is True and payload["model_config"]["patch_memory"] is True
    assert payload["model_config"]["composition_check"] is True
    state = payload["model_state"]
    assert all(bool(state[f"{check}.fitted"]) for check in ("global_branch", "patch_memory", "composition_check"))
    assert not any(k.startswith("global_branch.encoder") for k in state)
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events.index("checks") < events.index("calibrated") < events.index("calibration_warning")
    assert "at least 99" in lines[events.index("calibration_warning")]["message"]  # 4 validation images for 1 %
    fit = lines[events.index("checks")]
    assert fit["patch_memory"]["candidates"] == 7 * 8 * 8  # 7 training images (1 held out), 8x8 patches at 64 px
    assert fit["global_branch"]["feature_dim"] == 304
    assert fit["composition_check"]["steps"] == 5 and fit["composition_check"]["images"] == 7
    # half of its batches are simulated logical anomalies to undo: 4 copies of each training image
    assert fit["composition_check"]["restoration_share"] == 0.5 and fit["composition_check"]["restoration_inputs"] == 28
    # its autoencoder trains in the run's precision, as SLSG did
    assert fit["composition_check"]["precision"] == lines[events.index("start")]["precision"]


@pytest.mark.parametrize("text, message", [
    ('{"simulation": {"logical_probabilty": 0.5}}', "logical_probabilty"),
    ('{"stepz": 5}', "stepz"),
    ("[1, 2]", "expected a mapping"),
    ("{not json", "cannot parse"),
])
def test_train_rejects_a_bad_settings_file_by_name(trained, tmp_path, text, message):
    settings = tmp_path / "bad.json"
    settings.write_text(text)
    proc = slsg("train", "--data", str(trained["data"]), "--category", "tray", "--out", str(tmp_path / "run"),
                "--steps", "1", "--pretrain-steps", "0", "--config", str(settings), check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checks_adds_and_removes_the_global_branch_without_retraining(trained, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(trained["checkpoint"].read_bytes())
    before = torch.load(ckpt, weights_only=False)
    info_before = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    slsg("checks", "--checkpoint", str(ckpt), "--global-branch", "on")
    on = torch.load(ckpt, weights_only=False)
    info_on = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    assert not info_before["global_branch"] and info_on["global_branch"]
    # the branch shares the patch memory's frozen encoder: no parameters of its own
    assert info_on["parameters"] == info_before["parameters"]
    assert on["model_config"]["global_branch"] is True and bool(on["model_state"]["global_branch.fitted"])
    # SLSG's weights kept, and the trained composition check with them (only its scale is refitted)
    shared = [k for k in before["model_state"] if not k.startswith(("global_branch.", "patch_memory."))]
    assert all(torch.equal(before["model_state"][k], on["model_state"][k]) for k in shared)
    proc = slsg("evaluate", "--checkpoint", str(ckpt), "--data", str(trained["data"]), "--out", str(tmp_path / "eval"))
    assert "structural" in proc.stdout
    slsg("checks", "--checkpoint", str(ckpt), "--global-branch", "off")
    off = torch.load(ckpt, weights_only=False)
    assert off["model_config"]["global_branch"] is False and not any(k.startswith("global_branch.") for k in off["model_state"])
    assert off["calibration"]["raw_threshold"] == pytest.approx(before["calibration"]["raw_threshold"])


def test_checks_removes_and_restores_the_patch_memory(trained, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(trained["checkpoint"].read_bytes())
    before = torch.load(ckpt, weights_only=False)
    assert before["model_config"]["patch_memory"] is True  # the default preset's
    slsg("checks", "--checkpoint", str(ckpt), "--patch-memory", "off")
    off = torch.load(ckpt, weights_only=False)
    info_off = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    assert off["model_config"]["patch_memory"] is False and not info_off["patch_memory"]
    assert not any(k.startswith("patch_memory.") for k in off["model_state"])
    assert any(k.startswith("reference_encoder.") for k in off["model_state"])  # the composition check's
    slsg("checks", "--checkpoint", str(ckpt), "--patch-memory", "on")
    on = torch.load(ckpt, weights_only=False)
    info_on = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    assert info_on["patch_memory"] and info_on["gflop_per_image"] > info_off["gflop_per_image"]
    for key, value in before["model_state"].items():  # same SLSG weights, same (deterministic) memory
        assert torch.equal(value, on["model_state"][key]), key
    assert on["calibration"]["raw_threshold"] == pytest.approx(before["calibration"]["raw_threshold"])


def test_checks_refits_the_patch_memory_with_the_runs_seed(trained, tmp_path):
    payload = torch.load(trained["checkpoint"], weights_only=False)
    payload["model_config"]["patch_memory_size"] = 64  # fewer than the 8 x 64 candidate patches: a real choice
    payload["model_state"]["patch_memory.memory"] = payload["model_state"]["patch_memory.memory"][:64]
    memories = {}
    for seed in (0, 3):
        ckpt = tmp_path / f"seed{seed}.pt"
        payload["train_config"]["seed"] = seed
        torch.save(payload, ckpt)
        slsg("checks", "--checkpoint", str(ckpt), "--patch-memory", "on")
        memories[seed] = torch.load(ckpt, weights_only=False)["model_state"]["patch_memory.memory"]
    assert memories[0].shape == memories[3].shape == (64, memories[0].shape[1])
    assert not torch.equal(memories[0], memories[3])  # the coreset's picks follow the run's seed, as in training


def test_checks_removes_and_retrains_the_composition_check(trained, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(trained["checkpoint"].read_bytes())
    before = torch.load(ckpt, weights_only=False)
    assert before["model_config"]["composition_check"] is True  # the default preset's
    for flag, value in (("--composition-steps", "3"), ("--composition-restoration", "0.2")):
        proc = slsg("checks", "--checkpoint", str(ckpt), flag, value, check=False)
        assert proc.returncode == 2 and f"{flag} needs --composition-check on" in proc.stderr
    slsg("checks", "--checkpoint", str(ckpt), "--composition-check", "off")
    off = torch.load(ckpt, weights_only=False)
    info_off = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    assert off["model_config"]["composition_check"] is False and not info_off["composition_check"]
    assert not any(k.startswith("composition_check.") for k in off["model_state"])
    slsg("checks", "--checkpoint", str(ckpt), "--composition-check", "on", "--composition-steps", "4",
         "--composition-restoration", "0.25")
    on = torch.load(ckpt, weights_only=False)
    info_on = json.loads(slsg("info", "--checkpoint", str(ckpt), "--json").stdout)
    assert on["model_config"]["composition_steps"] == 4 and bool(on["model_state"]["composition_check.fitted"])
    assert on["model_config"]["composition_restoration"] == 0.25
    assert info_on["composition_check"] and info_on["gflop_per_image"] > info_off["gflop_per_image"]
    retrained = [k for k in before["model_state"] if k.startswith("composition_check.encoder.")]
    assert retrained and not all(torch.equal(before["model_state"][k], on["model_state"][k]) for k in retrained)
    shared = [k for k in before["model_state"] if not k.startswith("composition_check.")]
    assert all(torch.equal(before["model_state"][k], on["model_state"][k]) for k in shared)  # SLSG kept


def test_checks_refits_a_checkpoint_with_the_other_reference_padding(trained, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(trained["checkpoint"].read_bytes())
    before = torch.load(ckpt, weights_only=False)
    assert before["model_config"]["reference_padding"] == "same"  # a new run: as the ImageNet weights were trained
    slsg("checks", "--checkpoint", str(ckpt), "--reference-padding", "symmetric")
    after = torch.load(ckpt, weights_only=False)
    assert after["model_config"]["reference_padding"] == "symmetric"
    state, old = after["model_state"], before["model_state"]
    assert not torch.equal(state["patch_memory.memory"], old["patch_memory.memory"])  # refitted on the new features
    retrained = [k for k in old if k.startswith("composition_check.encoder.")]  # its input changed: retrained
    assert retrained and not all(torch.equal(old[k], state[k]) for k in retrained)
    shared = [k for k in old if not k.startswith(("patch_memory.", "composition_check.", "component_check."))]
    assert all(torch.equal(old[k], state[k]) for k in shared)  # SLSG and the frozen encoder's weights kept
    proc = slsg("checks", "--checkpoint", str(ckpt), "--reference-padding", "diagonal", check=False)
    assert proc.returncode == 2 and "--reference-padding" in proc.stderr


def test_int8_export_and_onnx_evaluation(trained, tmp_path):
    """`slsg export --precision int8` writes its own version; `slsg evaluate` scores exported files through
    ONNX Runtime with the checkpoint evaluation's metrics (equal for the float32 graph)."""
    repo, data = tmp_path / "repo", str(trained["data"])
    slsg("export", "--checkpoint", trained["checkpoint"], "--repository", repo, "--name", "tray")
    # a 3-step model decides and ranks near its threshold by chance: the guard has its own test (tests/train)
    proc = slsg("export", "--checkpoint", trained["checkpoint"], "--repository", repo, "--name", "tray",
                "--precision", "int8", "--max-decision-change", "1", "--min-rank-correlation", "-1")
    assert "threshold set on the INT8 graph's own scores" in proc.stdout and "decisions changed" in proc.stdout
    assert list_versions(repo, "tray") == [1, 2]
    cards = [ModelCard.from_json(ort.InferenceSession(str(repo / "tray" / str(v) / "model.onnx"),
                                                      providers=["CPUExecutionProvider"])
                                 .get_modelmeta().custom_metadata_map[MODEL_CARD_KEY]) for v in (1, 2)]
    assert [c.precision for c in cards] == ["fp32", "int8"]
    assert cards[1].extra["fp32_calibration"]["raw_threshold"] == cards[0].calibration.raw_threshold
    assert cards[1].extra["int8_check"]["images"] == 2 * cards[1].calibration.num_images
    assert load_config(repo / "tray" / "config.pbtxt").parameters["slsg.precision"].string_value == "int8"

    slsg("evaluate", "--checkpoint", trained["checkpoint"], "--data", data, "--out", tmp_path / "eval-ckpt")
    metrics = {"ckpt": json.loads((tmp_path / "eval-ckpt" / "metrics.json").read_text())}
    for version in (1, 2):
        out = tmp_path / f"eval-v{version}"
        slsg("evaluate", "--model-repository", repo, "--name", "tray", "--version", str(version), "--data", data,
             "--out", out)
        metrics[version] = json.loads((out / "metrics.json").read_text())
    assert metrics[1]["checkpoint"]["precision"] == "fp32" and metrics[2]["checkpoint"]["precision"] == "int8"
    assert metrics[1]["counts"] == metrics["ckpt"]["counts"] == metrics[2]["counts"]
    for key, value in metrics["ckpt"]["image_auroc"].items():
        assert metrics[1]["image_auroc"][key] == pytest.approx(value, abs=1e-9)
    assert metrics[1]["pixel_auroc"] == pytest.approx(metrics["ckpt"]["pixel_auroc"], abs=1e-4)
    assert metrics[2]["threshold"]["raw"] == cards[1].calibration.raw_threshold
    same = slsg("evaluate", "--onnx", repo / "tray" / "2" / "model.onnx", "--data", data, "--out", tmp_path / "by-file")
    assert json.loads((tmp_path / "by-file" / "metrics.json").read_text())["image_auroc"] == metrics[2]["image_auroc"]
    assert "written to" in same.stdout
    both = slsg("evaluate", "--checkpoint", trained["checkpoint"], "--onnx", repo / "tray" / "1" / "model.onnx",
                "--data", data, "--out", tmp_path / "x", check=False)
    assert both.returncode == 2 and "exactly one of --checkpoint, --onnx, --model-repository" in both.stderr
