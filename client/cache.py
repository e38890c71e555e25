"""What a site process keeps between rounds: its data, and a model to load weights into.

A simulated federation runs many sites in a few long-lived worker processes, and a
real SuperNode runs one site in one process for many rounds. Without these caches
every train and every evaluate request re-cut (and, for ``synthetic``, re-shifted)
the site's images and rebuilt the network (a second for DenseNet-121 on a CPU),
although neither changes during a run.

* :func:`site_data` keeps :class:`~federation.data.SiteData` per (data config, seed,
  site, number of sites), least recently used first out once the kept bytes exceed
  a budget (``simulation.data_cache_mb``). The sites of one federation partition the
  pooled dataset, so a worker that serves every site keeps at most one extra copy
  of it, never one per site.
* :func:`checkout_model` / :func:`release_model` lend an already built network of
  the same architecture. The caller always loads the full global state dict into
  it (``load_state_dict`` is strict), and training/evaluation seed their own
  randomness, so results are bit-for-bit those of a freshly built model. A model
  that is not released (an exception, a refusal) is simply not reused.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from federation.config.schema import DataConfig, ModelConfig
from federation.data import SiteData, load_site_data
from federation.models import check_dp_compatible

logger = logging.getLogger(__name__)

_MB = 1 << 20
#: Idle models kept per process (one per architecture).
MAX_IDLE_MODELS = 4

_lock = threading.Lock()
_data: OrderedDict[tuple, tuple[SiteData, int]] = OrderedDict()
_models: OrderedDict[tuple, nn.Module] = OrderedDict()
_lent: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_dp_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _nbytes(data: SiteData) -> int:
    return sum(int(t.numel() * t.element_size()) for split in (data.train, data.test) for t in split.tensors)


def site_data(config: DataConfig, *, seed: int, site_index: int, num_sites: int, budget_mb: int) -> SiteData:
    """This site's data, loaded once per process while it fits in ``budget_mb``.

    Args:
        config: The ``data`` section (with the site's ``data_dir``).
        seed: Experiment seed.
        site_index: Zero-based site number.
        num_sites: Number of sites the dataset is split into.
        budget_mb: Megabytes of site data kept per process (0: load every time).

    Returns:
        The same :class:`SiteData` object on every call while it stays cached.
        Treat it as read-only.
    """
    key = (config.model_dump_json(), int(seed), int(site_index), int(num_sites))
    with _lock:
        if key in _data:
            _data.move_to_end(key)
            return _data[key][0]
    data = load_site_data(config, seed=seed, site_index=site_index, num_sites=num_sites)
    size = _nbytes(data)
    if budget_mb <= 0 or size > budget_mb * _MB:
        return data
    with _lock:
        _data[key] = (data, size)
        while sum(entry[1] for entry in _data.values()) > budget_mb * _MB:
            _data.popitem(last=False)
    return data


def clear() -> None:
    """Forget every cached site dataset and idle model of this process."""
    with _lock:
        _data.clear()
        _models.clear()


def cached_bytes() -> int:
    """Bytes of site data held by the cache now."""
    with _lock:
        return sum(entry[1] for entry in _data.values())


def checkout_model(
    config: ModelConfig, *, in_channels: int, num_classes: int, dp: bool, build: Callable[[], nn.Module]
) -> nn.Module:
    """Lend an idle model of this architecture, or ``build()`` one.

    The caller must load a complete state dict into it before use and hand it back
    with :func:`release_model` when done (not doing so only costs a rebuild).
    Evaluation and training share the model; ``dp=True`` checks it for Opacus
    (:func:`~federation.models.check_dp_compatible`) once, before its first DP use.

    Raises:
        ConfigError: ``dp`` and the network cannot be trained with DP-SGD.
    """
    key = (config.model_dump_json(), int(in_channels), int(num_classes))
    with _lock:
        model = _models.pop(key, None)
    if model is None:
        model = build()
    if dp and model not in _dp_checked:
        check_dp_compatible(model, config)
        _dp_checked.add(model)
    _lent[model] = key
    return model


def release_model(model: nn.Module) -> None:
    """Hand back a model from :func:`checkout_model` for the next request of this process."""
    with _lock:
        key = _lent.pop(model, None)
        if key is None:
            return
        _models[key] = model
        _models.move_to_end(key)
        while len(_models) > MAX_IDLE_MODELS:
            _models.popitem(last=False)
