"""Device selection and mixed precision, the same for every stage."""

from __future__ import annotations

import contextlib

import torch

from offroad_seg.core.text import plural
from offroad_seg.errors import ConfigError

# Compute capability from which bf16 is native (Ampere: A100, RTX 30, and later). Older cards
# (T4, V100, RTX 20) emulate bf16 at a fraction of their fp16 speed.
BF16_NATIVE_CAPABILITY = (8, 0)


def parse_device(device: str | torch.device, cuda_count: int, current: int = 0) -> torch.device:
    """The device a request names, on a machine with `cuda_count` CUDA devices (`current` is
    the current one): 'auto' is CUDA when there is one, else the CPU; a CUDA device always
    comes back with its index; unavailable ones are errors."""
    if str(device) == "auto":
        device = "cuda" if cuda_count else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device}: not a device name (e.g. cpu, cuda, cuda:1)") from e
    if dev.type != "cuda":
        return dev
    if not cuda_count:
        raise ConfigError(f"device {device}: CUDA is not available on this machine")
    index = current if dev.index is None else dev.index
    if index >= cuda_count:
        raise ConfigError(
            f"device {device}: this machine has {plural(cuda_count, 'CUDA device')}, "
            + ("cuda:0" if cuda_count == 1 else f"cuda:0 to cuda:{cuda_count - 1}")
        )
    return torch.device("cuda", index)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`parse_device` on this machine. A CUDA device also becomes the current one: work that
    names no device (a new stream or event, pinned buffers, the DataLoader's pinning thread)
    then runs on it instead of on GPU 0, where it would wait on, or mark, nothing of ours."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    current = torch.cuda.current_device() if count else 0
    dev = parse_device(device, count, current)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def amp_dtype_for(capability: tuple[int, int]) -> torch.dtype:
    """Autocast type for a CUDA card of this compute capability: bf16 where it is native,
    fp16 (with loss scaling in training: see `grad_scaler`) on older cards."""
    return torch.bfloat16 if tuple(capability) >= BF16_NATIVE_CAPABILITY else torch.float16


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type of a device: bf16 or fp16 on CUDA, None (plain fp32) elsewhere (CPU
    bf16 is slower than fp32 on most CPUs)."""
    if device.type != "cuda":
        return None
    return amp_dtype_for(torch.cuda.get_device_capability(device))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (`amp_dtype`); plain fp32 elsewhere."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training (small fp16 gradients flush to zero without it); a
    disabled scaler, which changes nothing, in bf16 and fp32."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
