"""Mixed precision for training: bfloat16 autocast where the device computes it natively.

Only the forward passes of pre-training and SLSG's training run their convolutions and matrix
products in bfloat16 (``torch.autocast``). The weights, the optimiser state, the losses and everything
after stay float32: fitting the reference checks (the composition check's autoencoder too: its score
is its residual), calibration, export. bfloat16 keeps float32's exponent range, so unlike float16 it
needs no loss scaling. On a CPU with AVX512-BF16 a 256x256 SLSG step takes about half the time; on
CUDA GPUs from Ampere on, the tensor cores do the same.
"""

from __future__ import annotations

import contextlib

import torch

from slsg_train.training.config import check_precision


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (else autocast would emulate it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # torch's own CPU probes (private: absent ones count as no)
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device has it natively, else ``fp32``; the others as given."""
    check_precision(name)
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp32")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward-pass context for a resolved precision."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
