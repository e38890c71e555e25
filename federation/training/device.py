"""Device selection, seeding and thread settings for local training."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)


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
