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

import copy
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
#: RecordDict key of the next round's share step, sent ahead within this round's unmask request and reply.
AHEAD_KEY = "secagg-ahead"
#: What each stage's reply may hold (a share or unmask reply may also carry the public keys of a later round).
_REPLY_ENTRIES = {"advertise": ({"pk1", "pk2"},), "share": ({"dsts", "ctxts"}, {"dsts", "ctxts", "pk1", "pk2"}),
                  "unmask": ({"nids", "shares"}, {"nids", "shares", "pk1", "pk2"})}
_NODE_ID = re.compile(r"^[0-9]{1,20}$")
_MAX_BLOB = 4096  # bytes: an X25519 public key, a Fernet ciphertext of two shares, a share
#: Context.state slots: a site holds the secrets of at most two rounds (the one being unmasked and the next).
_SLOTS = (SECAGG_KEY, f"{SECAGG_KEY}-later")


def _record(msg: Message, key: str = SECAGG_KEY) -> ConfigRecord:
    record = msg.content.config_records.get(key) if msg.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise SecAggProtocolError("the request carries no secure-aggregation record")
    return record


def _states(context: Context) -> dict[int, SiteSecAgg]:
    """The rounds whose secrets the site holds, by round."""
    states = {}
    for slot in _SLOTS:
        saved = context.state.config_records.get(slot)
        if isinstance(saved, ConfigRecord) and len(saved):
            state = SiteSecAgg.from_state_dict(dict(saved.items()))
            states[state.server_round] = state
    return states


def _load(states: Mapping[int, SiteSecAgg], server_round: int) -> SiteSecAgg:
    if server_round not in states:
        held = ", ".join(str(r) for r in sorted(states)) or "none"
        raise SecAggProtocolError(f"no secure-aggregation keys were made for round {server_round} "
                                  f"(the site holds keys of round {held})")
    return states[server_round]


def _fresh(states: dict[int, SiteSecAgg], *, node_id: int, server_round: int) -> tuple[bytes, bytes]:
    """New keys for ``server_round``; they replace that round's and any later round's, and rounds before the last."""
    for old in [r for r in states if r >= server_round or r < server_round - 1]:
        del states[old]
    state, pk1, pk2 = SiteSecAgg.start(node_id=node_id, server_round=server_round)
    states[server_round] = state
    return pk1, pk2


def _save(context: Context, states: Mapping[int, SiteSecAgg]) -> None:
    """Keep the two latest rounds' states (a finished round's secrets are dropped by the caller)."""
    kept = sorted(states)[-len(_SLOTS):]
    for index, slot in enumerate(_SLOTS):
        if index < len(kept):
            context.state[slot] = ConfigRecord(states[kept[index]].state_dict())
        elif slot in context.state:
            del context.state[slot]


def answer_stage(msg: Message, context: Context) -> tuple[str, RecordDict]:
    """Answer one ``query.secagg`` request; returns the stage and the reply content (checked).

    A share or unmask request that names a later round (``next``) is also answered with
    that round's fresh public keys. An unmask request may carry the next round's share
    step (``secagg-ahead``), so that the next round needs neither an advertise nor a share
    exchange: it is answered in the same reply when it can be, and left out (the next round
    then falls back to the two exchanges) when it cannot. A request that breaks the
    protocol is answered with a ``secagg-protocol`` refusal, and nothing of it is kept.
    """
    record = _record(msg)
    stage = str(record.get("stage", ""))
    states = _states(context)
    try:
        reply = RecordDict({SECAGG_KEY: ConfigRecord(_answer(stage, record, states, node_id=int(context.node_id)))})
    except (SecAggProtocolError, KeyError, ValueError) as error:
        logger.warning("secure aggregation %s request refused: %s", stage[:20], error)
        return stage, RecordDict({"status": ConfigRecord({"refused": refusal("secagg-protocol", _safe(error))})})
    if stage == "unmask" and AHEAD_KEY in msg.content.config_records:
        ahead = _record(msg, AHEAD_KEY)
        try:
            if str(ahead.get("stage", "")) != "share" or int(ahead.get("round", 0)) != int(record["round"]) + 1:
                raise SecAggProtocolError("only the next round's share step can be sent ahead")
            trial = {r: copy.deepcopy(state) for r, state in states.items()}  # kept only if answered
            answered = _answer("share", ahead, trial, node_id=int(context.node_id))
        except (SecAggProtocolError, KeyError, ValueError) as error:  # the next round falls back to its own exchanges
            logger.warning("secure aggregation: the next round's share step sent ahead was not answered: %s", error)
        else:
            states = trial
            reply[AHEAD_KEY] = ConfigRecord(answered)
    _save(context, states)
    return stage, check_stage_reply(reply, stage=stage)


def _answer(stage: str, record: ConfigRecord, states: dict[int, SiteSecAgg], *, node_id: int) -> dict:
    """One stage's reply entries; updates ``states`` (raises SecAggProtocolError for a request to refuse)."""
    server_round = int(record.get("round", 0))
    if stage == "advertise":
        pk1, pk2 = _fresh(states, node_id=node_id, server_round=server_round)
        return {"pk1": pk1, "pk2": pk2}
    if stage == "share":
        state = _load(states, server_round)
        neighbours = {int(n): (bytes(a), bytes(b)) for n, a, b in zip(record["nids"], record["pk1s"], record["pk2s"])}
        out = state.share_keys(neighbours, params=SecAggParams.from_config(dict(record.items())))
        reply: dict = {"dsts": [str(n) for n in out], "ctxts": list(out.values())}
    elif stage == "unmask":
        state = _load(states, server_round)
        shares = state.unmask(active=[int(n) for n in record["active"]], dropped=[int(n) for n in record["dropped"]])
        del states[server_round]  # one answer per round: this round's secrets are gone
        reply = {"nids": [str(n) for n in shares], "shares": list(shares.values())}
    else:
        raise SecAggProtocolError(f"unknown stage {stage[:20]!r}")
    later = int(record.get("next", 0))
    if later:
        if later != server_round + 1:
            raise SecAggProtocolError(f"keys can be made ahead for round {server_round + 1} only, not {later}")
        pk1, pk2 = _fresh(states, node_id=node_id, server_round=later)
        reply.update(pk1=pk1, pk2=pk2)
    return reply


def _safe(error: Exception) -> str:
    """The refusal detail: the protocol's own message, restricted to the guard's alphabet."""
    text = re.sub(r"[^A-Za-z0-9 _.,:;=<>()'+*%-]", " ", str(error))[:200].strip()
    return re.sub(r"[0-9.]{14,}", "<id>", text) or "malformed request"


def check_stage_reply(content: RecordDict, *, stage: str) -> RecordDict:
    """Raise :class:`OutboundViolation` unless ``content`` holds only what ``stage`` sends."""
    allowed = _REPLY_ENTRIES.get(stage)
    ahead_allowed = {SECAGG_KEY, AHEAD_KEY} if stage == "unmask" else {SECAGG_KEY}
    if allowed is None or SECAGG_KEY not in content or not set(content.keys()) <= ahead_allowed:
        raise OutboundViolation(f"secure-aggregation reply to {stage!r} carries {sorted(content.keys())}")
    if AHEAD_KEY in content:
        _check_record(content[AHEAD_KEY], stage="share")
    _check_record(content[SECAGG_KEY], stage=stage)
    return content


def _check_record(record: object, *, stage: str) -> None:
    allowed = _REPLY_ENTRIES[stage]
    if not isinstance(record, ConfigRecord) or set(record.keys()) not in allowed:
        raise OutboundViolation(f"secure-aggregation reply to {stage!r} must hold exactly one of "
                                f"{[sorted(entries) for entries in allowed]}")
    for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            ok = _NODE_ID.match(item) if isinstance(item, str) else isinstance(item, bytes) and len(item) <= _MAX_BLOB
            if not ok:
                raise OutboundViolation(f"secure-aggregation entry {name!r} holds something other than ids or keys")


def secure_round(msg: Message, context: Context, *, server_round: int) -> SiteSecAgg | None:
    """The round's protocol state with the received shares, or None for a plain round.

    Called before training, so a broken protocol fails before any epsilon is spent.
    """
    if not msg.has_content() or SECAGG_KEY not in msg.content.config_records:
        return None
    record = msg.content.config_records[SECAGG_KEY]
    states = _states(context)
    state = _load(states, server_round)
    state.receive({int(n): bytes(c) for n, c in zip(record["srcs"], record["ctxts"])})
    _save(context, states)
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
    states = _states(context)
    states[state.server_round] = state
    _save(context, states)
    return ArrayRecord({MASKED_ARRAY: Array(masked)})


def check_masked_record(record: ArrayRecord, *, global_weights: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`OutboundViolation` unless ``record`` is exactly one masked uint64 vector of the model's size."""
    size = sum(int(t.numel()) for t in global_weights.values()) + 1
    array = record.get(MASKED_ARRAY) if set(record.keys()) == {MASKED_ARRAY} else None
    if array is None or array.dtype != "uint64" or tuple(array.shape) != (size,):
        raise OutboundViolation(f"a secure-aggregation reply holds exactly one uint64 array {MASKED_ARRAY!r} "
                                f"of {size} elements")
