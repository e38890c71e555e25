"""Rewrite pyproject.toml's [tool.flwr.app.config] from federation/config/schema.py.

Flower only accepts run-config overrides for keys the app declares, so the Flower
App config must list every medfed key with its default. Run this after changing the
schema: ``python scripts/sync_app_config.py`` (tests/test_config.py checks it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federation.config import ExperimentConfig  # noqa: E402

MARKER = "\n[tool.flwr.app.config]\n"


def main() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    head = text.split(MARKER, 1)[0]
    body = tomli_w.dumps({"tool": {"flwr": {"app": {"config": ExperimentConfig().model_dump()}}}})
    path.write_text(head + "\n" + body)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
