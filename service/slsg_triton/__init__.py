"""A real Triton Inference Server on a laptop or CI machine: the ``tritonserver`` binary of the
``nvidia-pytriton`` wheel serving a production model repository through its Python backend
(``onnx_model.py``) on the CPU. Neither the gateway nor the training side imports it."""
