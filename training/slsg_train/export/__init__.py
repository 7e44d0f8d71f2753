"""Export of trained SLSG networks into the model-repository contract (ONNX)."""

from .onnx_export import ExportCheck, ExportError, InferenceGraph, calibrate, export_onnx, verify_onnx

__all__ = ["ExportCheck", "ExportError", "InferenceGraph", "calibrate", "export_onnx", "verify_onnx"]
