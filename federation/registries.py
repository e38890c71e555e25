"""One rule for medfed's name registries: models, datasets and strategies.

Each registry maps a config value (``model.name``, ``data.dataset``,
``strategy.name``) to code, and each follows the same rule:

* ``register_<kind>(name, builder, *, replace=False, **details)``: ``name`` is
  lower-case letters, digits, ``_`` or ``-``, starting with a letter
  (:data:`NAME_RULE`); registering a taken name is an error unless ``replace=True``
  (:func:`check_new_name`);
* an unknown name is a :class:`~federation.config.ConfigError` naming the key, the
  name and every valid name (:func:`unknown_name`).

Registries hold only code installed on the machine: a run config (which reaches the
hospitals from the coordinator) selects a registered name, never names code to load.
Coordinator-side strategy plug-ins come from installed packages through the
``medfed.strategies`` entry-point group (:mod:`strategies.registry`).
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable

from federation.config.loading import ConfigError

NAME_RULE = "lower-case letters, digits, '_' or '-', starting with a letter"
_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def check_new_name(kind: str, name: object, registered: Container[str], *, replace: bool) -> None:
    """Raise ValueError unless ``name`` may be registered as a ``kind`` (valid, and new or ``replace``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid {kind} name {name!r}: use {NAME_RULE}")
    if name in registered and not replace:
        raise ValueError(f"{kind} {name!r} is already registered; pass replace=True to replace it")


def unknown_name(kind: str, *, key: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for an unknown name: the key, the name and every valid name (raise it)."""
    return ConfigError([f"{key}: unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}"], source=key)
