"""Secure aggregation as a strategy wrapper: the coordinator sees only the sum of the updates.

:class:`SecureAggregation` wraps a strategy that needs only the (weighted) mean of
the sites' updates (FedAvg, FedProx, FedAvgM, FedAdam/FedYogi/FedAdagrad). Within
each training round it runs SecAgg+ (Bell et al. 2020) as Message exchanges with
the sampled sites, through the same Grid and inside the same round of Flower's
unchanged ``Strategy.start()`` loop:

* ``configure_train``: stage 1 (``query.secagg``, *advertise*: sites send two public
  keys) and stage 2 (*share*: with the round's parameters, each site sends its secret
  shares encrypted for its neighbours), then the inner strategy's train messages, each
  carrying the ciphertexts addressed to its site;
* the sites train and reply with a masked, quantized, weighted update;
* ``aggregate_train``: stage 4 (*unmask*: surviving sites send the shares that remove
  the masks), then the sum is dequantized into the mean update and handed to the inner
  strategy as the single reply it aggregates.

Stages 1 and 2 need no exchange of their own after round 1: when every connected site
was sampled, the unmask request also carries the next round's share step (each site's
neighbours and their keys for that round, ``secagg-ahead``) and the reply its encrypted
shares and its keys for the round after. The next round uses them if it samples exactly
the sites that answered; otherwise (a changed sample, a lost reply) it runs stages 1-2
again, and the sites that shared ahead make fresh keys. When the strategy samples a
subset, only the next round's keys ride on the unmask reply. A secure round then adds
one message exchange to a plain round's two.

Sites that drop out at any stage are tolerated down to the reconstruction threshold;
below it the round is not aggregated (the global model stays) and the run goes on.
The maths is in :mod:`federation.secagg`, the site's side in ``client/secagg.py``.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.config import ExperimentConfig
from federation.secagg import SecAggParams, VectorLayout, reconstruct_sum, share_graph
from federation.secagg.params import holders_per_site, threshold_for
from federation.secagg.site import MIN_HOLDERS
from federation.secagg.vectors import dequantize_sum
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)

#: Message type of the protocol's extra stages (a site registers ``@app.query("secagg")``).
SECAGG_MESSAGE_TYPE = "query.secagg"
#: RecordDict key of the protocol's ConfigRecord, in requests and replies alike.
SECAGG_KEY = "secagg"
#: RecordDict key of the next round's share step, sent within this round's unmask request (and answered in its reply).
AHEAD_KEY = "secagg-ahead"
#: The one array of a masked training reply.
MASKED_ARRAY = "secagg-masked"
#: Strategies that aggregate only a weighted mean of the updates (all that secure aggregation can give them).
SUM_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass
class _Round:
    """What the coordinator learned in one round's stages 1-2 (public keys and routing only)."""

    server_round: int
    layout: VectorLayout
    global_vector: np.ndarray
    params: SecAggParams | None = None
    everyone: bool = False  # every connected site was sampled: the next round's share step is sent ahead
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    partners: dict[int, list[int]] = field(default_factory=dict)  # node -> neighbours that sent it shares


@dataclass
class _SharedAhead:
    """A round's stage 2, run within the previous round's unmask exchange (no message round trip of its own)."""

    server_round: int
    params: SecAggParams
    graph: dict[int, list[int]]
    public_keys: dict[int, tuple[bytes, bytes]]
    shared: dict[int, ConfigRecord] = field(default_factory=dict)  # node -> its share reply


def _ids(nodes: Iterable[int]) -> list[str]:
    return [str(int(n)) for n in nodes]  # Flower node ids are uint64: they travel as text


def _request(node: int, record: dict, round_config: ConfigRecord, ahead: dict | None = None) -> Message:
    """A protocol request; ``round_config`` (run name, round) files it in the site's audit log under its run."""
    content = RecordDict({SECAGG_KEY: ConfigRecord(record), "config": round_config})
    if ahead is not None:
        content[AHEAD_KEY] = ConfigRecord(ahead)
    return Message(content, dst_node_id=node, message_type=SECAGG_MESSAGE_TYPE)


def _contents(replies: Iterable[Message]) -> dict[int, RecordDict]:
    """The contents of the replies without error, by sending node."""
    out: dict[int, RecordDict] = {}
    for reply in replies:
        if reply.has_error() or not reply.has_content():
            logger.info("secagg: node %s dropped out (%s)", reply.metadata.src_node_id,
                        reply.error.reason if reply.has_error() else "no content")
            continue
        out[int(reply.metadata.src_node_id)] = reply.content
    return out


def _records(contents: dict[int, RecordDict], key: str = SECAGG_KEY) -> dict[int, ConfigRecord]:
    """The protocol records under ``key`` (refusals carry none), by sending node."""
    return {node: content.config_records[key] for node, content in contents.items()
            if isinstance(content.config_records.get(key), ConfigRecord)}


def _answers(replies: Iterable[Message]) -> dict[int, ConfigRecord]:
    """The protocol records of the replies without error, by sending node."""
    return _records(_contents(replies))


def _public_keys_of(records: dict[int, ConfigRecord]) -> dict[int, tuple[bytes, bytes]]:
    return {n: (bytes(r["pk1"]), bytes(r["pk2"])) for n, r in records.items() if "pk1" in r and "pk2" in r}


class SecureAggregation(StrategyWrapper):
    """Run SecAgg+ within each training round around a mean-aggregating ``inner`` strategy.

    Args:
        inner: The strategy that turns the mean update into the next global model.
        params: The protocol's parameters (threshold filled in per round from ``threshold_fraction``).
        num_shares: Share holders per secret (0 = every sampled site).
        threshold_fraction: Share holders needed to reconstruct, as a fraction (> 0.5).
        timeout: Seconds each extra stage waits for replies (``server.round_timeout``).
    """

    def __init__(self, *, inner: Strategy, params: SecAggParams, num_shares: int, threshold_fraction: float,
                 timeout: float | None) -> None:
        super().__init__(inner=inner)
        self.params = params
        self.num_shares = num_shares
        self.threshold_fraction = threshold_fraction
        self.timeout = timeout
        self._grid: Grid | None = None
        self._round: _Round | None = None
        self._round_config = ConfigRecord({})
        self._keys: dict[int, dict[int, tuple[bytes, bytes]]] = {}  # round -> node -> keys made ahead, not yet shared
        self._ahead: _SharedAhead | None = None
        self.last_outcome: str = ""
        self.last_weight: int | None = None  # the round's total weight: all the coordinator learns of the counts

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Stages 1 and 2 with the sites the inner strategy sampled (unless sent ahead); then their train messages."""
        self._grid, self._round = grid, None
        self._round_config = ConfigRecord({**{k: v for k, v in config.items() if k == "run-name"},
                                           "server-round": server_round})
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        if not nodes:
            return messages
        numpy_arrays = {name: array.numpy() for name, array in arrays.items()}
        layout = VectorLayout.of(numpy_arrays)
        state = _Round(server_round=server_round, layout=layout, global_vector=layout.flatten(numpy_arrays),
                       everyone=set(nodes) == {int(n) for n in grid.get_node_ids()})
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.server_round == server_round and set(nodes) == set(ahead.shared):
            state.params, state.public_keys, graph, shared = ahead.params, ahead.public_keys, ahead.graph, ahead.shared
        else:  # round 1, a changed sample or a lost reply: the sites that shared ahead make fresh keys
            staged = self._share_stage(state, nodes, grid)
            if staged is None:
                return []
            graph, shared = staged
        routed: dict[int, dict[int, bytes]] = {}
        for source, record in shared.items():
            for destination, ciphertext in zip(record["dsts"], record["ctxts"]):
                if int(destination) in graph.get(source, ()):
                    routed.setdefault(int(destination), {})[source] = bytes(ciphertext)
        self._round = state
        out = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            if node not in shared:
                continue
            inbox = {s: c for s, c in routed.get(node, {}).items() if s in shared}
            state.partners[node] = sorted(inbox)
            content = RecordDict(dict(message.content.items()))
            content[SECAGG_KEY] = ConfigRecord({"srcs": _ids(inbox), "ctxts": list(inbox.values())})
            out.append(Message(content, dst_node_id=node, message_type=message.metadata.message_type))
        return out

    def _params_for(self, num_sites: int) -> tuple[int, SecAggParams]:
        """Share holders per secret and the round's parameters for ``num_sites`` sites."""
        holders = holders_per_site(num_sites=num_sites, num_shares=self.num_shares)
        threshold = threshold_for(holders=holders, fraction=self.threshold_fraction)
        return holders, SecAggParams(**{**self.params.to_config(), "threshold": threshold})

    def _share_stage(self, state: _Round, nodes: Sequence[int],
                     grid: Grid) -> tuple[dict[int, list[int]], dict[int, ConfigRecord]] | None:
        """Stages 1-2 as their own exchanges (None: too few sites); with every site sampled, the share
        replies carry the next round's keys."""
        holders, state.params = self._params_for(len(nodes))
        state.public_keys = self._public_keys(state.server_round, nodes, grid)
        if not self._enough(len(state.public_keys), state.params, "advertised keys"):
            return None
        graph = share_graph(sorted(state.public_keys), holders=holders, rng=random.Random(secrets.randbits(64)))
        shared = _answers(grid.send_and_receive(
            [_request(n, self._share_record(n, graph[n], state.server_round, state.params, state.public_keys,
                                            ask_next=state.everyone), self._round_config) for n in graph],
            timeout=self.timeout))
        if state.everyone:
            self._keys[state.server_round + 1] = _public_keys_of(shared)
        if not self._enough(len(shared), state.params, "shared keys"):
            return None
        return graph, shared

    def _public_keys(self, server_round: int, nodes: Sequence[int], grid: Grid) -> dict[int, tuple[bytes, bytes]]:
        """The sampled sites' public keys: made ahead and not yet shared, or asked for now (stage 1).

        Keys a site shared ahead were taken out of ``_keys`` when they were sent in the share
        step, so such a site is asked for fresh ones.
        """
        ahead = self._keys.pop(server_round, {})
        self._keys = {r: keys for r, keys in self._keys.items() if r > server_round}
        known = {n: ahead[n] for n in nodes if n in ahead}
        missing = [n for n in nodes if n not in known]
        if missing:
            for later in self._keys.values():  # fresh keys for this round replace a site's keys for later rounds
                for node in missing:
                    later.pop(node, None)
            asked = _answers(grid.send_and_receive(
                [_request(n, {"stage": "advertise", "round": server_round}, self._round_config) for n in missing],
                timeout=self.timeout,
            ))
            known.update(_public_keys_of(asked))
        return known

    def _share_record(self, node: int, neighbours: Sequence[int], server_round: int, params: SecAggParams,
                      public_keys: dict[int, tuple[bytes, bytes]], *, ask_next: bool) -> dict:
        record = {"stage": "share", "round": server_round, **params.to_config(), "nids": _ids(neighbours),
                  "pk1s": [public_keys[n][0] for n in neighbours], "pk2s": [public_keys[n][1] for n in neighbours]}
        if ask_next:
            record["next"] = server_round + 1
        return record

    def _enough(self, count: int, params: SecAggParams, what: str) -> bool:
        if count >= max(params.threshold, 2):
            return True
        self.last_outcome = f"secure aggregation stopped: {count} site(s) {what}, threshold {params.threshold}"
        logger.warning("secagg: %s; the round is not aggregated", self.last_outcome)
        return False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stage 4 with the sites whose masked update arrived; the mean update to the inner strategy."""
        replies = [r for r in replies if not r.has_error() and r.has_content()]
        state, grid = self._round, self._grid
        if state is None or grid is None or not replies:
            return None, None
        params = state.params
        masked = {int(r.metadata.src_node_id): r.content["arrays"][MASKED_ARRAY].numpy().astype(np.uint64)
                  for r in replies if "arrays" in r.content and MASKED_ARRAY in r.content["arrays"]}
        if not self._enough(len(masked), params, "sent a masked update"):
            return None, None
        dropped = set(state.partners) - set(masked)
        ahead = self._share_ahead(state, masked)
        requests = []
        for node in masked:
            hood = set(state.partners[node]) | {node}
            record = {"stage": "unmask", "round": server_round, "active": _ids(sorted(hood & set(masked))),
                      "dropped": _ids(sorted(hood & dropped))}
            if ahead is None or node not in ahead.graph:
                record["next"] = server_round + 1  # the next round's keys, made now (its share step stays)
            share = None if ahead is None or node not in ahead.graph else self._share_record(
                node, ahead.graph[node], ahead.server_round, ahead.params, ahead.public_keys, ask_next=True)
            requests.append(_request(node, record, self._round_config, share))
        contents = _contents(grid.send_and_receive(requests, timeout=self.timeout))
        answers = _records(contents)
        self._keys[server_round + 1] = {**self._keys.get(server_round + 1, {}), **_public_keys_of(answers)}
        if ahead is not None:
            ahead.shared = _records(contents, AHEAD_KEY)
            self._keys[server_round + 2] = _public_keys_of(ahead.shared)
            self._ahead = ahead if ahead.shared else None
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        for record in answers.values():
            for node, share in zip(record["nids"], record["shares"]):
                (seed_shares if int(node) in masked else key_shares).setdefault(int(node), []).append(bytes(share))
        try:
            total = reconstruct_sum(
                masked=masked, partners=state.partners, seed_shares=seed_shares, key_shares=key_shares,
                mask_public_keys={n: keys[1] for n, keys in state.public_keys.items()}, threshold=params.threshold,
            )
            mean_update, weight = dequantize_sum(total, params=params)
        except ValueError as error:
            self.last_outcome = f"secure aggregation could not unmask: {error}"
            logger.warning("secagg round %d: %s; the round is not aggregated", server_round, error)
            return None, None
        self.last_weight = weight
        self.last_outcome = f"secure aggregation of {len(masked)} sites ({len(dropped)} dropped out)"
        logger.info("secagg round %d: %s", server_round, self.last_outcome)
        return super().aggregate_train(server_round, [self._as_reply(replies[0], state, mean_update, weight, replies)])

    def _share_ahead(self, state: _Round, masked: dict[int, np.ndarray]) -> _SharedAhead | None:
        """The next round's share step, to send with this round's unmask requests, when every site was sampled.

        Its graph joins the sites that unmask now and whose keys for the next round are
        known; the next round uses it only if it samples exactly the sites that answered it.
        """
        keys = self._keys.pop(state.server_round + 1, {})
        candidates = {n: keys[n] for n in sorted(masked) if n in keys}
        if not state.everyone or len(candidates) < MIN_HOLDERS:
            self._keys[state.server_round + 1] = keys
            return None
        holders, params = self._params_for(len(candidates))
        graph = share_graph(sorted(candidates), holders=holders, rng=random.Random(secrets.randbits(64)))
        return _SharedAhead(server_round=state.server_round + 1, params=params, graph=graph, public_keys=candidates)

    def _as_reply(self, template: Message, state: _Round, mean_update: np.ndarray, weight: int,
                  replies: Sequence[Message]) -> Message:
        """One reply holding the mean model (global + mean update) and the sites' plain metrics averaged."""
        weights = state.layout.unflatten(state.global_vector + mean_update)
        metrics: dict[str, float] = {"num-examples": float(weight)}
        names = set.intersection(*(set(r.content["metrics"]) for r in replies if "metrics" in r.content)) \
            if all("metrics" in r.content for r in replies) else set()
        for name in sorted(names - {"num-examples"}):
            metrics[name] = float(np.mean([float(r.content["metrics"][name]) for r in replies]))
        content = RecordDict({
            "arrays": ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in weights.items()}),
            "metrics": MetricRecord(metrics),
        })
        return Message(content=content, metadata=template.metadata)  # the sites' own replies stay as received


def with_secure_aggregation(strategy: Strategy, *, config: ExperimentConfig) -> Strategy:
    """Wrap ``strategy`` in :class:`SecureAggregation` when ``secagg.enabled``; otherwise return it unchanged.

    Raises:
        ValueError: For a strategy that needs individual updates, central DP, or quantized transfer.
    """
    settings = config.secagg
    if not settings.enabled:
        return strategy
    problems = secagg_config_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    params = SecAggParams(threshold=0, clipping_range=settings.clipping_range,
                          quantization_bits=settings.quantization_bits, weighting=settings.weighting,
                          max_weight=settings.max_weight)
    return SecureAggregation(inner=strategy, params=params, num_shares=settings.num_shares,
                             threshold_fraction=settings.threshold, timeout=config.server.round_timeout)


def secagg_config_problems(config: ExperimentConfig) -> list[str]:
    """Why ``secagg.enabled`` cannot run with the rest of ``config`` (empty when it can)."""
    if not config.secagg.enabled:
        return []
    problems = []
    name = config.strategy.name.strip().lower()
    if name not in SUM_STRATEGIES:
        problems.append(
            f"secagg.enabled=true with strategy.name={name!r}: the coordinator sees only the sum of the updates, "
            f"so robust aggregators that need each update cannot run; use one of {list(SUM_STRATEGIES)}"
        )
    if config.central_dp.enabled:
        problems.append(
            "secagg.enabled=true with central_dp.enabled=true: the coordinator cannot clip updates it cannot see; "
            "keep the sites' DP-SGD (privacy.*) for privacy, or disable one of the two"
        )
    if config.train.transfer_dtype != "fp32":
        problems.append(
            f"secagg.enabled=true with train.transfer_dtype={config.train.transfer_dtype!r}: secure aggregation "
            "quantizes the update itself (secagg.quantization_bits); set train.transfer_dtype=fp32"
        )
    return problems
