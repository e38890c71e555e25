"""The site's side of secure aggregation: the protocol's stages as ClientApp requests.

The coordinator's wrapper (``strategies/secagg.py``) sends ``query.secagg`` messages
for the protocol's extra stages and adds the shares addressed to this site to the
training message. This module answers them with :class:`federation.secagg.SiteSecAgg`,
keeping the site's secrets for the round in Flower's ``Context.state`` (it stays on
the SuperNode; a deployed site starts a fresh process for every message), and turns
a trained model into the masked update that leaves instead of the weights.

Everything a stage sends is checked here (public keys, ciphertexts, shares of the
site's own secrets: bytes of bounded size, node ids as digits), as the outbound
guard checks the other replies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.guard import OutboundViolation, refusal
from federation.secagg import SecAggParams, SecAggProtocolError, SiteSecAgg, VectorLayout
from federation.secagg.vectors import quantize_update

logger = logging.getLogger(__name__)

#: RecordDict key of the protocol's records (requests, replies, the site's Context.state).
SECAGG_KEY = "secagg"
#: The one array of a masked training reply (the coordinator's wrapper reads it by this name).
MASKED_ARRAY = "secagg-masked"
#: What each stage's reply may hold (the unmask reply may also carry the next round's public keys).
_REPLY_ENTRIES = {"advertise": ({"pk1", "pk2"},), "share": ({"dsts", "ctxts"},),
                  "unmask": ({"nids", "shares"}, {"nids", "shares", "pk1", "pk2"})}
_NODE_ID = re.compile(r"^[0-9]{1,20}$")
_MAX_BLOB = 4096  # bytes: a compressed P-384 point, an X25519 key, a Fernet ciphertext of two shares, a share


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(SECAGG_KEY) if msg.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise SecAggProtocolError("the request carries no secure-aggregation record")
    return record


def _load(context: Context, server_round: int) -> SiteSecAgg:
    saved = context.state.config_records.get(SECAGG_KEY)
    if not isinstance(saved, ConfigRecord):
        raise SecAggProtocolError("no secure-aggregation keys were made for this round")
    state = SiteSecAgg.from_state_dict(dict(saved.items()))
    if state.server_round != server_round:
        raise SecAggProtocolError(f"the keys are of round {state.server_round}, the request of round {server_round}")
    return state


def _save(context: Context, state: SiteSecAgg) -> None:
    context.state[SECAGG_KEY] = ConfigRecord(state.state_dict())


def answer_stage(msg: Message, context: Context) -> tuple[str, RecordDict]:
    """Answer one ``query.secagg`` request; returns the stage and the reply content (checked).

    An unmask request that names the next round (``next``) is also answered with that
    round's fresh public keys, so the next round needs no advertise step. A request
    that breaks the protocol is answered with a ``secagg-protocol`` refusal.
    """
    record = _record(msg)
    stage, server_round = str(record.get("stage", "")), int(record.get("round", 0))
    try:
        if stage == "advertise":
            state, pk1, pk2 = SiteSecAgg.start(node_id=int(context.node_id), server_round=server_round)
            reply = {"pk1": pk1, "pk2": pk2}
        elif stage == "share":
            state = _load(context, server_round)
            neighbours = {int(n): (bytes(a), bytes(b)) for n, a, b in zip(record["nids"], record["pk1s"], record["pk2s"])}
            out = state.share_keys(neighbours, params=SecAggParams.from_config(dict(record.items())))
            reply = {"dsts": [str(n) for n in out], "ctxts": list(out.values())}
        elif stage == "unmask":
            state = _load(context, server_round)
            shares = state.unmask(active=[int(n) for n in record["active"]], dropped=[int(n) for n in record["dropped"]])
            reply = {"nids": [str(n) for n in shares], "shares": list(shares.values())}
            if int(record.get("next", 0)) == server_round + 1:  # this round is done: its secrets can go
                state, pk1, pk2 = SiteSecAgg.start(node_id=int(context.node_id), server_round=server_round + 1)
                reply.update(pk1=pk1, pk2=pk2)
        else:
            raise SecAggProtocolError(f"unknown stage {stage[:20]!r}")
    except (SecAggProtocolError, KeyError, ValueError) as error:
        logger.warning("secure aggregation %s request refused: %s", stage[:20], error)
        return stage, RecordDict({"status": ConfigRecord({"refused": refusal("secagg-protocol", _safe(error))})})
    _save(context, state)
    return stage, check_stage_reply(RecordDict({SECAGG_KEY: ConfigRecord(reply)}), stage=stage)


def _safe(error: Exception) -> str:
    """The refusal detail: the protocol's own message, restricted to the guard's alphabet."""
    text = re.sub(r"[^A-Za-z0-9 _.,:;=<>()'+*%-]", " ", str(error))[:200].strip()
    return re.sub(r"[0-9.]{14,}", "<id>", text) or "malformed request"


def check_stage_reply(content: RecordDict, *, stage: str) -> RecordDict:
    """Raise :class:`OutboundViolation` unless ``content`` holds only what ``stage`` sends."""
    allowed = _REPLY_ENTRIES.get(stage)
    if allowed is None or set(content.keys()) != {SECAGG_KEY}:
        raise OutboundViolation(f"secure-aggregation reply to {stage!r} carries {sorted(content.keys())}")
    record = content[SECAGG_KEY]
    if not isinstance(record, ConfigRecord) or set(record.keys()) not in allowed:
        raise OutboundViolation(f"secure-aggregation reply to {stage!r} must hold exactly one of "
                                f"{[sorted(entries) for entries in allowed]}")
    for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            ok = _NODE_ID.match(item) if isinstance(item, str) else isinstance(item, bytes) and len(item) <= _MAX_BLOB
            if not ok:
                raise OutboundViolation(f"secure-aggregation entry {name!r} holds something other than ids or keys")
    return content


def secure_round(msg: Message, context: Context, *, server_round: int) -> SiteSecAgg | None:
    """The round's protocol state with the received shares, or None for a plain round.

    Called before training, so a broken protocol fails before any epsilon is spent.
    """
    if not msg.has_content() or SECAGG_KEY not in msg.content.config_records:
        return None
    record = msg.content.config_records[SECAGG_KEY]
    state = _load(context, server_round)
    state.receive({int(n): bytes(c) for n, c in zip(record["srcs"], record["ctxts"])})
    _save(context, state)
    return state


def masked_update(
    state: SiteSecAgg, context: Context, *, weights: Mapping[str, torch.Tensor],
    global_weights: Mapping[str, torch.Tensor], num_examples: int,
) -> ArrayRecord:
    """The trained model's update, quantized, weighted and masked: the only array that leaves."""
    layout = VectorLayout.of({k: v.detach().cpu().numpy() for k, v in global_weights.items()})
    update = layout.flatten({k: weights[k].detach().cpu().double().numpy() for k in layout.names}) - layout.flatten(
        {k: v.detach().cpu().double().numpy() for k, v in global_weights.items()})
    params = state.params
    weight = min(int(num_examples), params.max_weight) if params.weighting == "examples" else 1
    vector, clipped = quantize_update(update, params=params, weight=weight, rng=np.random.default_rng())
    if clipped > 0:
        logger.warning("secure aggregation: %.2f%% of the update's elements exceed secagg.clipping_range=%g "
                       "and were clipped", 100 * clipped, params.clipping_range)
    masked = state.masked_vector(vector)
    _save(context, state)
    return ArrayRecord({MASKED_ARRAY: Array(masked)})


def check_masked_record(record: ArrayRecord, *, global_weights: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`OutboundViolation` unless ``record`` is exactly one masked uint64 vector of the model's size."""
    size = sum(int(t.numel()) for t in global_weights.values()) + 1
    array = record.get(MASKED_ARRAY) if set(record.keys()) == {MASKED_ARRAY} else None
    if array is None or array.dtype != "uint64" or tuple(array.shape) != (size,):
        raise OutboundViolation(f"a secure-aggregation reply holds exactly one uint64 array {MASKED_ARRAY!r} "
                                f"of {size} elements")
