"""Triton ``config.pbtxt`` for an exported SLSG model, and reading it back.

The production configuration targets NVIDIA's Triton container on a GPU with the
``onnxruntime`` backend: dynamic batching with a short queue delay (inspection stations
send single frames, so small batches form only under load), optionally TensorRT FP16
through ONNX Runtime's TensorRT execution provider, and the model card stored as string
``parameters`` so clients can read the calibration and input size from the server
(``card_from_config``) instead of hard-coding them.

Torch-free; protobuf and tritonclient's ``model_config_pb2`` are imported inside the
functions that need them, so ``slsg`` stays importable with numpy alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slsg.contract import (
    CONFIG_FILENAME, INPUT_IMAGE, MODEL_CARD_KEY, MODEL_FILENAME, OUTPUT_ANOMALY_MAP, OUTPUT_PART_COUNTS, OUTPUT_SCORE,
    ModelCard, validate_model_name,
)

# Card fields also published as flat parameters (handy in `curl .../config` and dashboards).
# Prefixed so they never collide with the onnxruntime backend's own parameter keys
# (e.g. "intra_op_thread_count").
FLAT_CARD_PARAMETERS: dict[str, str] = {
    "slsg.category": "category",
    "slsg.backbone": "backbone",
    "slsg.input_height": "input_height",
    "slsg.input_width": "input_width",
    "slsg.top_k": "top_k",
    "slsg.project_version": "project_version",
    "slsg.precision": "precision",
}
RAW_THRESHOLD_PARAMETER = "slsg.raw_threshold"
TRT_WORKSPACE_BYTES = 1 << 30


class ConfigError(ValueError):
    """A model configuration text that Triton would reject (unknown field, bad enum, ...)."""


def _quote(value: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes/backslashes/controls escaped)."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(value, as_utf8=True) + '"'


def _parameters_block(card: ModelCard) -> list[str]:
    values = {MODEL_CARD_KEY: card.to_json()}
    values.update({key: str(getattr(card, attr)) for key, attr in FLAT_CARD_PARAMETERS.items()})
    values[RAW_THRESHOLD_PARAMETER] = repr(float(card.calibration.raw_threshold))
    return [
        f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
        for k, v in values.items()
    ]


def _tensorrt_block(trt_cache_dir: str | None) -> list[str]:
    params = {"precision_mode": "FP16", "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES)}
    if trt_cache_dir:  # engine building takes minutes; the cache makes restarts fast
        params.update({"trt_engine_cache_enable": "true", "trt_engine_cache_path": trt_cache_dir})
    lines = ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [ {",
             '      name: "tensorrt"']
    lines += [f"      parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in params.items()]
    return lines + ["    } ]", "  }", "}"]


def _check_arguments(max_batch_size: int, preferred_batch_sizes: tuple[int, ...], max_queue_delay_us: int,
                     instance_count: int, num_versions: int, tensorrt: bool, gpu: bool) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad:
        raise ValueError(f"preferred_batch_sizes {bad} must lie in [1, max_batch_size={max_batch_size}]")
    if max_queue_delay_us < 0 or instance_count < 1 or num_versions < 1:
        raise ValueError("max_queue_delay_us must be >= 0, instance_count and num_versions >= 1")
    if tensorrt and not gpu:
        raise ValueError("tensorrt=True needs gpu=True: TensorRT is a GPU execution accelerator")


def production_config(
    name: str,
    card: ModelCard,
    max_batch_size: int = 8,
    tensorrt: bool = False,
    preferred_batch_sizes: tuple[int, ...] = (4, 8),
    max_queue_delay_us: int = 2000,
    instance_count: int = 1,
    gpu: bool = True,
    num_versions: int = 2,
    trt_cache_dir: str | None = None,
) -> str:
    """``config.pbtxt`` text for ``name`` served by Triton's onnxruntime backend.

    Shapes follow the contract without the batch dimension (``max_batch_size > 0`` makes it
    implicit): ``image`` UINT8 [H, W, 3] -> ``anomaly_map`` FP32 [1, H, W], ``score`` FP32 [1].
    A card with part kinds adds ``part_counts`` FP32 [K] (K part kinds).
    ``num_versions=2`` keeps the previous version loaded next to the newest for A/B checks.
    """
    validate_model_name(name)
    _check_arguments(max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count,
                     num_versions, tensorrt, gpu)
    h, w = int(card.input_height), int(card.input_width)
    preferred = ", ".join(str(b) for b in preferred_batch_sizes)
    lines = [
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"default_model_filename: {_quote(MODEL_FILENAME)}",
        f"max_batch_size: {max_batch_size}",
        f"version_policy {{ latest {{ num_versions: {num_versions} }} }}",
        "input [",
        f"  {{ name: {_quote(INPUT_IMAGE)} data_type: TYPE_UINT8 dims: [ {h}, {w}, 3 ] }}",
        "]",
        "output [",
        f"  {{ name: {_quote(OUTPUT_ANOMALY_MAP)} data_type: TYPE_FP32 dims: [ 1, {h}, {w} ] }},",
        f"  {{ name: {_quote(OUTPUT_SCORE)} data_type: TYPE_FP32 dims: [ 1 ] }}" + ("," if card.part_kinds else ""),
        # one config serves every version of the model, and versions may count different part kinds
        f"  {{ name: {_quote(OUTPUT_PART_COUNTS)} data_type: TYPE_FP32 dims: [ -1 ] }}"
        if card.part_kinds else "",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]" if preferred_batch_sizes else "",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instance_count} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]",
    ]
    if tensorrt:
        lines += _tensorrt_block(trt_cache_dir)
    lines += _parameters_block(card)
    return "\n".join(line for line in lines if line) + "\n"


def parse_config(text: str, source: str | os.PathLike[str] = "<config>") -> Any:
    """Parse config text into ``tritonclient.grpc.model_config_pb2.ModelConfig``.

    Raises ``ConfigError`` naming ``source`` on any unknown field, bad enum or syntax error,
    i.e. everything Triton itself would refuse to load.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: invalid Triton model configuration: {exc}") from exc


def load_config(path: str | os.PathLike[str]) -> Any:
    """Read and parse a ``config.pbtxt`` file (``ConfigError`` names the file on failure)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model configuration not found")
    return parse_config(path.read_text(encoding="utf-8"), source=path)


def config_to_text(cfg: Any) -> str:
    """A ``ModelConfig`` message back to ``config.pbtxt`` text."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def write_config(repository: str | os.PathLike[str], name: str, card: ModelCard, **kw: Any) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` (validated, written atomically); returns its path.

    Keyword arguments go to ``production_config``.
    """
    text = production_config(name, card, **kw)
    parse_config(text, source=f"generated config for {name!r}")
    target = Path(repository) / name / CONFIG_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # Atomic replace: a polling Triton (or our shadow-repository sync) never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".config.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, target)
    return target


def card_from_config(cfg: Any) -> ModelCard:
    """The ``ModelCard`` stored in a model configuration's parameters.

    Accepts a ``ModelConfig`` message (gRPC ``get_model_config(...).config``) or the JSON
    dict that the HTTP API returns (``{"parameters": {key: {"string_value": ...}}}``).
    """
    if isinstance(cfg, Mapping):
        params = cfg.get("config", cfg).get("parameters", {})
        entry = params.get(MODEL_CARD_KEY)
        text = entry.get("string_value") if isinstance(entry, Mapping) else None
    else:
        text = cfg.parameters[MODEL_CARD_KEY].string_value if MODEL_CARD_KEY in cfg.parameters else None
    if not text:
        raise KeyError(f"model configuration has no {MODEL_CARD_KEY!r} parameter (not an SLSG export?)")
    return ModelCard.from_json(text)
