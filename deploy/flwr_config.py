"""The coordinator's SuperLink connection in Flower's own config file (``$FLWR_HOME/config.toml``).

Flower 1.42 keeps SuperLink connections (``[superlink.NAME]`` with ``address``,
``root-certificates``, ``insecure``) in ``$FLWR_HOME/config.toml`` (default
``~/.flwr``), not in the app's ``pyproject.toml``; ``flwr run . NAME`` uses them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import tomli_w

from federation.flower_internals import DEFAULT_FLOWER_CONFIG_TOML


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr`` (as Flower resolves it)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(*, name: str, entry: dict[str, object], home: Path | None = None, default: bool = False) -> Path:
    """Add or replace ``[superlink.NAME]`` in Flower's config, keeping every other entry.

    Args:
        name: Connection name (``flwr run . NAME``).
        entry: The table, e.g. from :func:`deploy.commands.connection_entry`.
        home: Flower's config folder (default :func:`flwr_home`).
        default: Also make it the default connection.

    Returns:
        The config file path.
    """
    path = (home or flwr_home()) / "config.toml"
    # A fresh file starts from Flower's own defaults (its `local` connection stays default).
    data: dict = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML ({err}); fix or move it, nothing was written") from err
    superlink = data.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise ValueError(f"{path}: [superlink] is not a table")
    if "default" not in superlink:
        superlink["default"] = name
    if default:
        superlink["default"] = name
    superlink[name] = dict(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)
    return path
