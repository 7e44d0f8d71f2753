"""How the network computes: bfloat16 autocast where the device has it natively, channels-last layout.

Only training's forward passes run their convolutions and matrix products in bfloat16
(``torch.autocast``): pre-training's, SLSG's and the composition check's autoencoder's. The weights,
the optimiser state, the losses and every score stay float32: the reference checks' fits and scores
(the autoencoder's residual too), calibration, export. bfloat16 keeps float32's exponent range, so
unlike float16 it needs no loss scaling. CPUs with AVX512-BF16 or AMX and CUDA GPUs from Ampere on
compute it natively (speed-ups in docs/results.md).

Every model that trains or infers keeps its 4-D weights, and so its activations, channels-last (NHWC):
oneDNN's convolutions and bilinear resizes run natively in that layout and reorder NCHW tensors at
each call. The numbers agree within float rounding; saved weights load into either layout, and the
exported graph is the same.
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


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its 4-D parameters and buffers in the channels-last layout (in place), except
    its dilated convolutions, which keep NCHW weights and get NCHW inputs.

    Why the exception: torch 2.13's oneDNN computes the weight gradient of a dilated convolution in
    NHWC under bfloat16 autocast wrongly (depthwise or dense: errors of 150 % to NaN against float64,
    different from call to call; NCHW's are 0.4 %, bfloat16 rounding). Forward passes and input
    gradients are right. The skip attention's dilated depthwise convolution is the only one here."""
    module.to(memory_format=torch.channels_last)
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv2d) and max(conv.dilation) > 1:
            conv.to(memory_format=torch.contiguous_format)
            if _nchw_input not in conv._forward_pre_hooks.values():  # converting twice adds no second hook
                conv.register_forward_pre_hook(_nchw_input)
    return module


def _nchw_input(conv: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
