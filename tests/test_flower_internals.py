"""Flower's and Ray's internals are reached only through the two adapter modules, behind one version check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from federation import flower_internals
from federation.flower_internals import SUPPORTED_FLWR, UnsupportedFlowerError, check_flower_version

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = {"federation/flower_internals.py", "strategies/flower_internals.py"}
PACKAGES = ("medfed", "federation", "client", "server", "strategies", "simulations", "certs", "deploy", "dashboard")
#: Flower's public API: the Message API's three packages (and the strategies in flwr.serverapp.strategy).
PUBLIC_FLOWER = re.compile(r"^flwr\.(app|serverapp|clientapp)(\.strategy)?$")
FLOWER_MODULE = re.compile(r"\bflwr(?:\.\w+)+")
IMPORT = re.compile(r"^\s*(?:from\s+(flwr(?:\.\w+)*)\s+import|import\s+(flwr(?:\.\w+)*))", re.M)
#: Ray's private attributes (``._ray_...``) and Flower's private members (``._check_and_log_replies``, ...).
PRIVATE_USE = re.compile(r"\._ray_\w+|\._check_and_log_replies|\.add_messages_to_queue|\bTaskIdentity\b|"
                         r"\b_run_simulation\b")


def _offences(text: str) -> list[str]:
    found = [module for groups in IMPORT.findall(text) for module in groups if module]
    found = [module for module in found if not PUBLIC_FLOWER.match(module)]
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    strings = [m for m in FLOWER_MODULE.findall(code) if not PUBLIC_FLOWER.match(m) and "(" not in m]
    found += [m for m in strings if re.search(rf"['\"]{re.escape(m)}['\"]", code)]  # module names in strings
    found += PRIVATE_USE.findall(code)
    return found


def test_no_flower_or_ray_internal_outside_the_two_adapters() -> None:
    offences = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ADAPTERS:
                continue
            found = _offences(path.read_text())
            if found:
                offences[rel] = found
    assert offences == {}, f"Flower/Ray internals outside {sorted(ADAPTERS)}: {offences}"


def test_the_scan_finds_what_it_looks_for() -> None:
    assert _offences("from flwr.superlink.grid.inmemory_grid import InMemoryGrid\n") == [
        "flwr.superlink.grid.inmemory_grid"]
    assert _offences("from flwr.supernode import start_client_internal\n") == ["flwr.supernode"]
    assert _offences("import flwr.supercore.logger\n") == ["flwr.supercore.logger"]
    assert _offences("x = ctx.current_actor._ray_actor_creation_function_descriptor\n") == [
        "._ray_actor_creation_function_descriptor"]
    assert _offences("valid, _ = self._check_and_log_replies(replies, is_train=True)\n") == [
        "._check_and_log_replies"]
    assert _offences('ACTOR = ("flwr.simulation.ray_transport.ray_actor", "ClientAppActor")\n') == [
        "flwr.simulation.ray_transport.ray_actor"]
    assert _offences("from flwr.app import Message\nfrom flwr.serverapp.strategy import FedAvg\n") == []


def test_the_installed_flower_is_supported() -> None:
    assert re.match(r"1\.42\.", check_flower_version())
    assert SUPPORTED_FLWR in (REPO / "pyproject.toml").read_text()  # the same range as the requirement


def test_an_unsupported_flower_fails_with_the_supported_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower_internals, "installed_flower_version", lambda: "1.43.0.dev20261201")
    monkeypatch.delenv(flower_internals.ALLOW_UNSUPPORTED_ENV, raising=False)
    check_flower_version.cache_clear()
    try:
        with pytest.raises(UnsupportedFlowerError) as err:
            check_flower_version()
        assert str(err.value).startswith("medfed supports flwr >=1.42,<1.43, but flwr 1.43.0.dev20261201 is installed")
        assert "pip install 'flwr[simulation]>=1.42,<1.43'" in str(err.value)
        check_flower_version.cache_clear()
        monkeypatch.setenv(flower_internals.ALLOW_UNSUPPORTED_ENV, "1")
        assert check_flower_version() == "1.43.0.dev20261201"  # the nightly check goes on, with a warning
    finally:
        check_flower_version.cache_clear()


def test_the_lazy_names_are_flowers_own() -> None:
    from flwr.common.constant import ErrorCode

    assert flower_internals.ErrorCode is ErrorCode
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flower_internals.nope  # noqa: B018
