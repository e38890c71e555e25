"""Package namespaces that import a submodule only when one of its names is used (PEP 562).

``import federation.data.paths`` runs ``federation/data/__init__.py`` first. When
that file imported every submodule, a command that needed one path helper (``medfed
--help``, ``medfed validate``, a site's policy check) paid for torch, MONAI and
pydicom: 3-8 s before printing anything. A package built with :func:`lazy_exports`
keeps its public names (``from federation.data import load_site_data`` works as
before) but resolves each one on first access.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a package with lazy public names.

    Args:
        package: The package's ``__name__``.
        exports: Submodule (absolute name) -> the public names it provides.

    Returns:
        ``(__getattr__, __dir__, __all__)`` to assign at the package's top level. A
        resolved name is stored in the package, so each is looked up once.

    Raises:
        ValueError: If two submodules export the same name.
    """
    owner: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in owner:
                raise ValueError(f"{package}: {name!r} exported by both {owner[name]} and {module}")
            owner[name] = module

    def __getattr__(name: str) -> Any:  # noqa: N807 - the PEP 562 hook
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the PEP 562 hook
        return sorted(set(vars(sys.modules[package])) | set(owner))

    return __getattr__, __dir__, sorted(owner)
