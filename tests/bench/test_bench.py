"""`slsg bench model|gateway|triton|load` on tiny real models (the GPU script: test_gpu_bench.py).

Each benchmark runs for real (ONNX Runtime, PyTorch, a uvicorn gateway on loopback, tritonserver,
a locust subprocess) with few iterations; the tests check the report's structure and sanity
(positive figures, zero failures, FLOP counts that agree), never its timings.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import make_card, write_contract_model, write_int8_contract_model
from slsg_bench.frames import camera_jpeg, parse_size
from slsg_bench.load import parse_duration
from slsg_bench.model import onnx_gflops
from slsg.cli import main
from slsg.contract import model_path
from slsg.triton_config import write_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINED_SIZE = 64


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    """Run ``slsg bench ...`` in-process; return its JSON document (stdout holds only JSON)."""
    code = main(["bench", *argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def positive(value: float | None) -> bool:
    return value is not None and value > 0 and np.isfinite(value)


@pytest.fixture(scope="module")
def toy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64x64 toy contract model with a CPU production config (max_batch_size 8)."""
    root = tmp_path_factory.mktemp("bench_toy")
    card = make_card("toy", size=64)
    write_contract_model(model_path(root, "toy", 1), card)
    write_config(root, "toy", card, gpu=False, max_batch_size=8)
    time.sleep(0.4)  # LocalTriton publishes a version once its files are 0.3 s old
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(repository, checkpoint) of a real SLSG model trained for 2 steps at 64x64 and exported."""
    work = tmp_path_factory.mktemp("bench_trained")
    size = str(TRAINED_SIZE)
    assert main(["synth", str(work / "data"), "--categories", "tray", "--image-size", size, "--train", "4",
                 "--validation", "2", "--test-good", "1", "--test-logical", "1", "--test-structural", "1"]) == 0
    assert main(["train", "--data", str(work / "data"), "--category", "tray", "--out", str(work / "run"),
                 "--image-size", size, "--steps", "2", "--pretrain-steps", "0", "--workers", "0",
                 "--batch-size", "2", "--composition-steps", "5"]) == 0
    checkpoint = work / "run" / "checkpoint.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--repository", str(work / "repo"), "--name", "tray",
                 "--cpu-config"]) == 0
    return work / "repo", checkpoint


def test_onnx_gflops_counts_conv_matmul_and_gemm(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # x [1, 4, 8, 8] -> grouped 3x3 conv (2 groups, 6 out) -> flatten [1, 384] -> Gemm to 10 -> MatMul to 5
    weights = {"w_conv": (6, 2, 3, 3), "w_gemm": (384, 10), "w_mm": (10, 5)}
    inits = [helper.make_tensor(n, TensorProto.FLOAT, s, np.zeros(s, np.float32).ravel().tolist())
             for n, s in weights.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["g"]),
        helper.make_node("MatMul", ["g", "w_mm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "flops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "flops.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    conv = 2 * (6 * 8 * 8) * (2 * 3 * 3)  # each output element: Cin/group * k * k multiply-adds
    gemm = 2 * 10 * 384
    matmul = 2 * 5 * 10
    assert onnx_gflops(path) * 1e9 == pytest.approx(conv + gemm + matmul)


def test_bench_model_compares_pytorch_and_onnx_runtime(trained, capsys) -> None:
    repository, checkpoint = trained
    report = run_json(capsys, "model", "--repository", str(repository), "--name", "tray", "--checkpoint",
                      str(checkpoint), "--threads", "1", "--iterations", "2", "--warmup", "1",
                      "--batch-sizes", "1,2", "--peak-size", "256")
    model = report["model"]
    assert model["input_size"] == [TRAINED_SIZE, TRAINED_SIZE] and model["gflop_source"] == "checkpoint_count_flops"
    # the ONNX graph's Conv/MatMul count must agree with torch's FlopCounterMode on the same network
    assert positive(model["gflop_per_image"])
    assert model["onnx_graph_gflop_per_image"] == pytest.approx(model["gflop_per_image"], rel=0.02)
    assert set(report["results"]) == {"pytorch_eager", "onnxruntime"}
    for result in report["results"].values():
        assert set(result["by_batch"]) == {"1", "2"}
        for row in result["by_batch"].values():
            assert row["batch_ms"]["n"] == 2
            assert 0 < row["batch_ms"]["median_ms"] <= row["batch_ms"]["p95_ms"]
            assert positive(row["images_per_s"]) and positive(row["gflops_achieved"])
    peak = report["matmul_peak"]
    assert set(peak["by_backend"]) == {"numpy", "onnxruntime"} and peak["threads"] == 1
    assert peak["gflops"] == max(p["gflops"] for p in peak["by_backend"].values()) > 0
    for key in ("ort_speedup_latency_batch1", "ort_speedup_best_throughput", "ort_fraction_of_matmul_peak"):
        assert positive(report["ratios"][key]), key
    assert report["environment"]["threads"] == 1


def test_bench_model_without_checkpoint_and_bad_input(toy_repository, capsys, tmp_path) -> None:
    report = run_json(capsys, "model", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--iterations", "2", "--batch-sizes", "1", "--peak-size", "128")
    assert set(report["results"]) == {"onnxruntime"}
    assert report["model"]["gflop_source"] == "onnx_graph"
    assert report["ratios"]["ort_speedup_latency_batch1"] is None  # nothing to compare against
    assert main(["bench", "model", "--repository", str(tmp_path), "--name", "missing"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_bench_model_against_a_second_model_in_the_same_rounds(toy_repository, capsys) -> None:
    report = run_json(capsys, "model", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--iterations", "2", "--batch-sizes", "1", "--peak-size", "128", "--against", "toy:1")
    assert set(report["results"]) == {"onnxruntime", "onnxruntime_against"}
    assert report["results"]["onnxruntime_against"]["by_batch"]["1"]["batch_ms"]["n"] == 2
    assert report["against"]["model"] == "toy:1" and report["against"]["path"].endswith("model.onnx")
    assert positive(report["ratios"]["latency_vs_against_batch1"])
    for bad, message in (("toy:one", "NAME:VERSION"), ("nothing", "nothing")):
        assert main(["bench", "model", "--repository", str(toy_repository), "--name", "toy", "--iterations", "1",
                     "--batch-sizes", "1", "--peak-size", "64", "--against", bad]) == 2
        assert message in capsys.readouterr().err


def test_bench_model_int8_against_float32_side_by_side(tmp_path, capsys) -> None:
    card = make_card("toy", size=32)
    write_contract_model(model_path(tmp_path, "toy", 1), card)
    write_int8_contract_model(model_path(tmp_path, "toy", 2), card)
    report = run_json(capsys, "model", "--repository", str(tmp_path), "--name", "toy", "--version", "2",
                      "--against", "toy:1", "--thread-counts", "1,2", "--batch-sizes", "1,3", "--iterations", "2",
                      "--warmup", "1")
    assert report["benchmark"] == "model_side_by_side"
    assert report["models"]["model"]["precision"] == "int8" and report["models"]["against"]["precision"] == "fp32"
    assert [(r["threads"], r["batch"]) for r in report["results"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in report["results"]:
        assert positive(row["model_images_per_s"]) and positive(row["against_images_per_s"]) and positive(row["speedup"])
        assert row["model_batch_ms"]["n"] == row["against_batch_ms"]["n"] == 2
    assert set(report["environment"]["instruction_sets"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert main(["bench", "model", "--repository", str(tmp_path), "--name", "toy", "--thread-counts", "1"]) == 2
    assert "--against" in capsys.readouterr().err


def test_cpu_instruction_sets_from_cpuinfo() -> None:
    from slsg_bench.model import cpu_instruction_sets

    vnni = "processor: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\nflags: amx_tile\n"
    assert cpu_instruction_sets(vnni) == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False,
                                          "avx512_bf16": True, "amx_tile": False, "amx_int8": False,
                                          "amx_bf16": False}
    assert not any(cpu_instruction_sets("flags: fpu sse2 avx").values())
    assert not any(cpu_instruction_sets("").values())


def test_bench_gateway_end_to_end(toy_repository, capsys) -> None:
    report = run_json(capsys, "gateway", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--frame-size", "640x512", "--concurrency", "1,2", "--requests", "6",
                      "--memory-requests", "10", "--iterations", "3")
    assert set(report["gateway"]) == {"1", "2"}
    for level in report["gateway"].values():
        assert level["failures"] == 0 and level["status_counts"] == {"200": 6}
        assert positive(level["latency_ms"]["median_ms"]) and positive(level["requests_per_s"])
        assert positive(level["server_median_ms"]["total_ms"])
    decode = report["decode"]
    assert decode["draft"]["draft_used"] is True and decode["full"]["draft_used"] is False
    assert positive(decode["draft_speedup"])
    assert positive(report["bare_model"]["best_images_per_s"])
    memory = report["memory"]
    assert memory["failures"] == 0 and memory["requests"] == 10
    assert len(memory["rss_mb"]) == 6 and all(positive(v) for v in memory["rss_mb"])  # before + 5 slices
    assert memory["growth_percent"] is not None and memory["late_growth_percent"] is not None
    for key in ("latency_overhead_vs_bare_model", "throughput_vs_bare_best"):
        assert positive(report["ratios"][key]), key


@pytest.mark.slow
def test_bench_triton_against_onnx_runtime(toy_repository, capsys) -> None:
    triton_local = pytest.importorskip("slsg_triton.local")
    try:
        triton_local.find_tritonserver()
    except triton_local.TritonNotFoundError as exc:
        pytest.skip(str(exc))
    report = run_json(capsys, "triton", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--iterations", "3", "--warmup", "1", "--batch-sizes", "1,8")
    assert set(report["results"]) == {"triton_grpc", "onnxruntime"}
    for by_batch in report["results"].values():
        assert set(by_batch) == {"1", "8"} and all(positive(r["images_per_s"]) for r in by_batch.values())
    assert positive(report["ratios"]["triton_over_ort_throughput_batch8"])
    assert positive(report["triton_startup_s"])


def test_bench_triton_rejects_batch_over_config(toy_repository, capsys) -> None:
    assert main(["bench", "triton", "--repository", str(toy_repository), "--name", "toy", "--batch-sizes", "16"]) == 2
    assert "max_batch_size 8" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_load_runs_locust_camera_mix(toy_repository, capsys) -> None:
    if importlib.util.find_spec("locust") is None:  # never import it here: locust monkey-patches with gevent
        pytest.skip("locust is not installed (dev extra)")
    report = run_json(capsys, "load", "--repository", str(toy_repository), "--name", "toy", "--threads", "1",
                      "--users", "3", "--duration", "4s", "--frame-size", "800x640", "--fps", "2-3")
    results = report["results"]
    assert results["failures"] == 0 and report["failure_samples"] == []
    # 3 cameras at 2-3 frames/s for 4 s: some frames must have gone through
    assert results["requests"] >= 3
    assert all(positive(results["latency_ms"][k]) for k in ("p50", "p95", "p99"))
    assert positive(results["requests_per_s"])
    assert report["locust"]["version"] and positive(report["memory"]["rss_mb_after"])


def test_frames_and_argument_parsing() -> None:
    from PIL import Image
    import io

    jpeg = camera_jpeg(320, 256, seed=1)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (320, 256)
    assert camera_jpeg(320, 256, seed=2) != jpeg  # distinct cameras send distinct frames
    assert parse_size("1600x1280") == (1600, 1280) and parse_duration("2m") == 120 and parse_duration("20s") == 20
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("1600")
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
