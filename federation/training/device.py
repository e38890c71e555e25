"""Device selection, seeding and thread settings for local training."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import random
import sys

import numpy as np
import torch

logger = logging.getLogger(__name__)

MALLOC_MMAP_THRESHOLD = 256 << 20
"""Blocks up to this size (bytes) come from glibc's heap instead of fresh ``mmap`` pages."""

MALLOC_TRIM_THRESHOLD = 1 << 30
"""glibc returns free heap memory to the OS only above this much (bytes)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_allocator_tuned: bool | None = None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def select_device(preference: str = "auto") -> torch.device:
    """Return the torch device to train on.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``
            or ``"cuda:N"``.

    Returns:
        The selected device.

    Raises:
        RuntimeError: If CUDA is requested but not available (or the index is out of range).
        ValueError: On an unknown preference.
    """
    choice = preference.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        return _cuda_device(choice)
    raise ValueError(f"unknown device {preference!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _cuda_device(choice: str) -> torch.device:
    """The requested CUDA device, or a clear error when it does not exist."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {choice!r} requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use train.device=auto or cpu"
        )
    device = torch.device(choice)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {choice!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global random generators.

    Args:
        seed: Any non-negative integer (reduced modulo 2**32 for NumPy).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads(num_threads: int) -> None:
    """Set torch's intra-op CPU threads when ``num_threads > 0`` (0 leaves torch's default)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        logger.debug("torch CPU threads set to %d", num_threads)


def use_amp(*, device: torch.device, requested: bool, private: bool) -> bool:
    """Whether to train under bf16 autocast: only on CUDA, when requested, and without DP.

    DP-SGD stays in fp32: per-sample gradient norms decide the clipping that bounds
    each example's influence, and the noise is calibrated to that bound, so they are
    computed at full precision (bf16 has an 8-bit mantissa).
    """
    return requested and not private and device.type == "cuda"


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed multi-megabyte blocks for reuse (once per process; Linux/glibc only).

    PyTorch allocates CPU tensors with ``malloc``. glibc serves large blocks with
    fresh pages from the kernel and returns freed heap memory above its trim
    threshold, so the multi-megabyte temporaries of every training step (per-sample
    gradients under DP above all: 9 MB for one 64-channel layer of the default CNN
    at batch 64) pay page faults and zeroing again and again. With the thresholds at
    :data:`MALLOC_MMAP_THRESHOLD` / :data:`MALLOC_TRIM_THRESHOLD` they are reused from
    the heap: the default CNN's DP step got 15-25 % faster on the 2-core development
    machine, the non-DP step unchanged (docs/BENCHMARKS.md, P2). Peak memory is
    unchanged; memory freed after a peak stays with the process (up to the trim
    threshold) instead of going back to the OS.

    Returns:
        Whether the allocator is tuned (False off glibc, e.g. macOS, Windows, musl).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = _mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and _mallopt(
            _M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD
        )
        logger.debug("glibc malloc thresholds %s", "raised" if _allocator_tuned else "left alone (not glibc)")
    return _allocator_tuned


def _mallopt(parameter: int, value: int) -> bool:
    """``mallopt(parameter, value)`` of glibc; False where there is no glibc or it refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))
    except (OSError, AttributeError):  # no libc, or a libc without mallopt (musl)
        return False
