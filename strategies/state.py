"""Save and restore the server-side state of strategies, so that a resumed run
continues exactly where it stopped.

Stateful strategies and what is saved (attribute names as in Flower 1.42, read and
written through :mod:`strategies.flower_internals`):

* FedAdam / FedYogi / FedAdagrad (``FedOpt``): ``current_arrays``, ``m_t``, ``v_t``
  (each ``dict[str, NDArray] | None``).
* FedAvgM: ``current_arrays`` (``ArrayRecord | None``) and ``momentum_vector``
  (``list[NDArray] | None``).
* Flower's ``DifferentialPrivacy*AdaptiveClipping`` wrappers: ``clipping_norm``.

Every other strategy is stateless and gives ``{}``. Wrappers are unwrapped
(:func:`strategies.wrapper.iter_layers`), so the state of
``QuorumStrategy(FedAdam)`` is FedAdam's.

The state is a flat ``dict[str, np.ndarray | float]`` (ready for ``np.savez``)
with keys ``"<owner>/<field>/<index>[/<array name>]"``; the index keeps the
order of the arrays even if a serializer sorts the keys (FedAvgM pairs arrays
by position). A field that is None is simply absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from strategies import flower_internals as flower
from strategies.wrapper import iter_layers

logger = logging.getLogger(__name__)

StrategyState = dict[str, np.ndarray | float]
"""Flat, serializable strategy state."""

_NamedArrays = dict[str, np.ndarray]


def _dump_named(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> StrategyState:
    if arrays is None:
        return {}
    return {f"{prefix}/{i}/{name}": np.array(value, copy=True) for i, (name, value) in enumerate(arrays.items())}


def _load_named(prefix: str, state: Mapping[str, np.ndarray | float]) -> _NamedArrays | None:
    entries: list[tuple[int, str, np.ndarray]] = []
    for key, value in state.items():
        if key.startswith(prefix + "/"):
            index, name = key[len(prefix) + 1 :].split("/", 1)
            entries.append((int(index), name, np.array(value, copy=True)))
    if not entries:
        return None
    return {name: value for _, name, value in sorted(entries, key=lambda entry: entry[0])}


def _dump_list(prefix: str, arrays: list[np.ndarray] | None) -> StrategyState:
    if arrays is None:
        return {}
    return {f"{prefix}/{i}": np.array(value, copy=True) for i, value in enumerate(arrays)}


def _load_list(prefix: str, state: Mapping[str, np.ndarray | float]) -> list[np.ndarray] | None:
    entries = sorted(
        (int(key[len(prefix) + 1 :]), np.array(value, copy=True))
        for key, value in state.items()
        if key.startswith(prefix + "/")
    )
    return [value for _, value in entries] if entries else None


def _dump_fedopt(strategy: Strategy) -> StrategyState:
    state: StrategyState = {}
    for name, arrays in flower.fedopt_fields(strategy).items():
        state.update(_dump_named(f"fedopt/{name}", arrays))
    return state


def _load_fedopt(strategy: Strategy, state: Mapping[str, np.ndarray | float]) -> None:
    flower.set_fedopt_fields(
        strategy, {name: _load_named(f"fedopt/{name}", state) for name in ("current_arrays", "m_t", "v_t")}
    )


def _dump_fedavgm(strategy: Strategy) -> StrategyState:
    current, momentum = flower.fedavgm_fields(strategy)
    named = None if current is None else {name: array.numpy() for name, array in current.items()}
    return {
        **_dump_named("fedavgm/current_arrays", named),
        **_dump_list("fedavgm/momentum_vector", momentum),
    }


def _load_fedavgm(strategy: Strategy, state: Mapping[str, np.ndarray | float]) -> None:
    named = _load_named("fedavgm/current_arrays", state)
    current = None if named is None else ArrayRecord({name: Array(value) for name, value in named.items()})
    flower.set_fedavgm_fields(strategy, current, _load_list("fedavgm/momentum_vector", state))


def _dump_dp_adaptive(strategy: Strategy) -> StrategyState:
    return {"dp_adaptive/clipping_norm": flower.clipping_norm(strategy)}


def _load_dp_adaptive(strategy: Strategy, state: Mapping[str, np.ndarray | float]) -> None:
    if "dp_adaptive/clipping_norm" in state:
        flower.set_clipping_norm(strategy, float(state["dp_adaptive/clipping_norm"]))


@dataclass(frozen=True)
class _Handler:
    """How to save and restore the state of one family of strategies."""

    owner: str
    kind: type
    dump: Callable[[Strategy], StrategyState]
    load: Callable[[Strategy, Mapping[str, np.ndarray | float]], None]


_HANDLERS = (
    _Handler("fedopt", flower.STATEFUL_KINDS["fedopt"], _dump_fedopt, _load_fedopt),
    _Handler("fedavgm", flower.STATEFUL_KINDS["fedavgm"], _dump_fedavgm, _load_fedavgm),
    _Handler("dp_adaptive", flower.STATEFUL_KINDS["dp_adaptive"], _dump_dp_adaptive, _load_dp_adaptive),
)


def _stateful_layers(strategy: Strategy) -> list[tuple[_Handler, Strategy]]:
    pairs = [
        (handler, layer) for layer in iter_layers(strategy) for handler in _HANDLERS if isinstance(layer, handler.kind)
    ]
    owners = [handler.owner for handler, _ in pairs]
    if len(owners) != len(set(owners)):
        raise ValueError(f"Cannot save the state of a chain holding two {owners} layers of one kind.")
    return pairs


def strategy_state(strategy: Strategy) -> StrategyState:
    """Return a copy of the server-side state of a (possibly wrapped) strategy.

    Args:
        strategy: The strategy, possibly wrapped.

    Returns:
        Flat ``{key: array or float}``; ``{}`` for stateless strategies. Arrays are
        copies, so later rounds do not change a saved state.
    """
    state: StrategyState = {}
    for handler, layer in _stateful_layers(strategy):
        state.update(handler.dump(layer))
    return state


def load_strategy_state(strategy: Strategy, state: Mapping[str, np.ndarray | float]) -> None:
    """Restore state saved by :func:`strategy_state` into a freshly built strategy.

    Fields absent from ``state`` are reset to None (the strategy's fresh value),
    so an empty ``state`` leaves a new strategy as built.

    Args:
        strategy: A strategy of the same kind (and wrapping) as the one saved.
        state: The saved state (e.g. read back from an ``.npz`` file).

    Raises:
        ValueError: If ``state`` holds keys that no layer of ``strategy`` owns,
            e.g. FedAdam state loaded into FedAvg.
    """
    pairs = _stateful_layers(strategy)
    owners = {handler.owner for handler, _ in pairs}
    unknown = sorted(key for key in state if key.split("/", 1)[0] not in owners)
    if unknown:
        raise ValueError(
            f"State keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''} do not belong to "
            f"{type(strategy).__name__} (stateful parts: {sorted(owners) or 'none'})."
        )
    if not pairs and not state:
        return
    for handler, layer in pairs:
        handler.load(layer, state)
        logger.debug("Restored %s state of %s", handler.owner, type(layer).__name__)
