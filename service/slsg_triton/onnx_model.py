"""Triton Python-backend model: serves one version's ONNX file with ONNX Runtime.

Copied as ``model.py`` into each version of the shadow repository (see ``local.py``). It runs inside
Triton's backend stub, so it imports only numpy, onnxruntime and Triton's own utilities. Its settings
come from the model configuration's ``parameters``, as in Triton's own Python-backend examples:
``slsg_model_file`` (the ONNX file in the version folder) and ``slsg_intra_op_threads``.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

MODEL_FILE_PARAMETER = "slsg_model_file"
THREADS_PARAMETER = "slsg_intra_op_threads"


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        model_file = _parameter(config, MODEL_FILE_PARAMETER, "model.onnx")
        path = os.path.join(args["model_repository"], args["model_version"], model_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, THREADS_PARAMETER, "1"))
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA libraries of pip's nvidia-* packages only once preloaded;
            # without them the session quietly runs on the CPU
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - the session below then reports what is missing
                print(f"slsg onnx_model: onnxruntime.preload_dlls() failed: {exc}", file=sys.stderr)
        self.session = ort.InferenceSession(path, options, providers=providers)
        # in the server log: which device this instance really runs on (ORT falls back quietly), and with
        # which numpy (the stub returns empty outputs with numpy 2)
        print(f"slsg onnx_model: {args['model_name']} v{args['model_version']} runs on {self.session.get_providers()} "
              f"(onnxruntime {ort.__version__}, numpy {np.__version__})", file=sys.stderr, flush=True)
        self.input_names = [spec["name"] for spec in config["input"]]
        self.output_names = [spec["name"] for spec in config["output"]]
        self.output_types = {spec["name"]: pb_utils.triton_string_to_numpy(spec["data_type"])
                             for spec in config["output"]}

    def execute(self, requests):
        # One ORT run for everything the dynamic batcher handed over, then split per request.
        inputs = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                   for name in self.input_names} for request in requests]
        sizes = [len(feed[self.input_names[0]]) for feed in inputs]
        batch = {name: np.concatenate([feed[name] for feed in inputs]) for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, batch)
        except Exception as exc:  # report to every caller instead of killing the stub
            error = pb_utils.TritonError(f"ONNX Runtime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:start + size], self.output_types[name]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
