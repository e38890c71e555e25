"""A redone round gets the reply already released, so its privacy is not spent twice.

A coordinator killed mid-run resumes from its last checkpoint (``server.resume``) and
asks again for the round it lost, with the same global model. A site that trained
that round already released (or may have released) its noisy update; training again
would be a second release of the same round, and its epsilon would be counted twice.
So after every trained round the site keeps its reply on its own disk
(``<state-dir>/runs/<run>/last-round.pt``: the round, a SHA-256 of the global model it
started from, the update and the metrics sent) and answers the same request, the same
round of the same run from the same global model, with exactly that reply: resending
a released output reveals nothing new (post-processing), so nothing is reserved,
trained or committed. Any other request (another round, another global model) trains
as usual.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REPLY_FILE = "last-round.pt"
"""The last trained round's reply, in the run's folder on the site's disk."""


def model_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def saved_reply(
    run_dir: Path, *, server_round: int, global_weights: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
    """The reply already sent for this round from this global model, or None.

    Args:
        run_dir: The run's folder on the site's disk.
        server_round: The round asked for.
        global_weights: The global model it was sent with.
    """
    path = Path(run_dir) / REPLY_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable copy is no reply: the round trains (and counts) again
        logger.warning("the saved reply %s does not load; the round is trained again", path)
        return None
    if int(saved.get("round", -1)) != int(server_round) or saved.get("digest") != model_digest(global_weights):
        return None
    return dict(saved["weights"]), {str(k): float(v) for k, v in saved["metrics"].items()}


def save_reply(
    run_dir: Path, *, server_round: int, global_weights: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor], metrics: Mapping[str, float],
) -> None:
    """Keep a trained round's reply (atomically, replacing the previous round's)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".last-round-", suffix=".pt")
    os.close(fd)
    torch.save({"round": int(server_round), "digest": model_digest(global_weights),
                "weights": {k: v.detach().cpu() for k, v in weights.items()},
                "metrics": {k: float(v) for k, v in metrics.items()}}, tmp)
    os.replace(tmp, run_dir / REPLY_FILE)
