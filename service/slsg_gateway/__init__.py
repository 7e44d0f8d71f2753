"""The inspection gateway: FastAPI in front of Triton or embedded ONNX Runtime. Never imports torch."""
