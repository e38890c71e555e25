"""Every use of a Flower strategy's internals, in one guarded place.

medfed's strategies build on Flower's through their public classes and hooks
(subclasses, ``aggregate_train``/``configure_train``, wrappers as Flower's own DP
wrappers). Three things need more, and are reached only through this module
(tests/test_flower_internals.py fails if they appear elsewhere):

* FedAvg's reply check (``_check_and_log_replies``), so the streamed average
  (:mod:`strategies.streaming`) drops exactly the replies Flower's FedAvg drops;
* the ``.npy`` bytes behind :class:`~flwr.app.Array` (``Array.data`` with
  ``stype == "numpy.ndarray"``), read in place instead of copied;
* the server-side state of FedOpt (FedAdam, FedYogi, FedAdagrad: ``current_arrays``,
  ``m_t``, ``v_t``), FedAvgM (``current_arrays``, ``momentum_vector``) and Flower's
  adaptive-clipping DP wrappers (``clipping_norm``), saved and restored by
  :mod:`strategies.state` so a resumed run continues exactly.

:func:`federation.flower_internals.check_flower_version` guards each of them.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.fedopt import FedOpt

from federation.flower_internals import check_flower_version

check_flower_version()  # importing the two private modules above already depends on it

#: The strategy families whose server-side state :mod:`strategies.state` saves, by owner name.
STATEFUL_KINDS: dict[str, type] = {
    "fedopt": FedOpt,
    "fedavgm": FedAvgM,
    "dp_adaptive": DifferentialPrivacyAdaptiveBase,
}

_NPY_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"


def valid_replies(strategy: FedAvg, replies: Iterable[Message], *, is_train: bool) -> list[Message]:
    """The replies FedAvg would aggregate (its own check, which also logs the dropped ones)."""
    valid, _ = strategy._check_and_log_replies(replies, is_train=is_train)  # noqa: SLF001
    return list(valid)


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """``(dtype, shape)`` of a C-ordered, pickle-free ``.npy`` header; None for anything else."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return None
    if fortran_order or dtype.hasobject:
        return None
    return dtype, tuple(shape)


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view on ``array``'s bytes (no copy); ``array.numpy()`` where that is impossible.

    Args:
        array: A Flower :class:`~flwr.app.Array` (``.npy`` serialized).

    Returns:
        An array equal to ``array.numpy()``.
    """
    data = array.data
    view = memoryview(data)
    if getattr(array, "stype", _NUMPY_STYPE) == _NUMPY_STYPE and len(view) >= 10 and bytes(view[:6]) == _NPY_MAGIC:
        major = view[6]
        start = 10 if major == 1 else 12
        length = int.from_bytes(view[8:start], "little")
        parsed = _npy_header(bytes(view[: start + length]))
        if parsed is not None:
            dtype, shape = parsed
            count = math.prod(shape)
            if len(view) == start + length + count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=start + length).reshape(shape)
    return array.numpy()


def fedopt_fields(strategy: Strategy) -> dict[str, dict[str, np.ndarray] | None]:
    """FedOpt's ``current_arrays``, ``m_t`` and ``v_t`` (each ``{name: array}`` or None)."""
    return {name: getattr(strategy, name) for name in ("current_arrays", "m_t", "v_t")}


def set_fedopt_fields(strategy: Strategy, fields: dict[str, dict[str, np.ndarray] | None]) -> None:
    """Restore what :func:`fedopt_fields` returned."""
    for name in ("current_arrays", "m_t", "v_t"):
        setattr(strategy, name, fields[name])


def fedavgm_fields(strategy: Strategy) -> tuple[ArrayRecord | None, list[np.ndarray] | None]:
    """FedAvgM's ``current_arrays`` and ``momentum_vector``."""
    return strategy.current_arrays, strategy.momentum_vector  # type: ignore[attr-defined]


def set_fedavgm_fields(strategy: Strategy, current: ArrayRecord | None, momentum: list[np.ndarray] | None) -> None:
    """Restore what :func:`fedavgm_fields` returned."""
    strategy.current_arrays = current  # type: ignore[attr-defined]
    strategy.momentum_vector = momentum  # type: ignore[attr-defined]


def clipping_norm(strategy: Any) -> float:  # noqa: ANN401 - a DifferentialPrivacy*AdaptiveClipping
    """The adaptive-clipping DP wrapper's current clipping norm."""
    return float(strategy.clipping_norm)


def set_clipping_norm(strategy: Any, value: float) -> None:  # noqa: ANN401
    """Restore the adaptive-clipping DP wrapper's clipping norm."""
    strategy.clipping_norm = float(value)
