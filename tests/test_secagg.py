"""Secure aggregation (secagg.*): the coordinator learns only the sum, with dropouts, through the real site code.

A fake Grid delivers the wrapper's Messages to sites in this process. The "protocol"
sites run the site's real secure-aggregation code (client/secagg.py) on updates the
test chooses, so the securely aggregated model can be compared with plain FedAvg
exactly; the "real" sites run the whole ClientApp (training, DP, guard, audit).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.secagg import MASKED_ARRAY, answer_stage, masked_update, secure_round
from federation.config import load_config
from federation.secagg import SecAggParams, SecAggProtocolError, SiteSecAgg
from strategies.secagg import SecureAggregation, secagg_config_problems

PARAMS = SecAggParams(threshold=0, clipping_range=1.0, quantization_bits=16, weighting="examples", max_weight=1000)
STEP = 2 * PARAMS.clipping_range / PARAMS.target_range  # one quantization step
NODES = [3, 10**19 + 7, 42, 5_000_000_000, 17]  # Flower node ids are uint64: some exceed int64
SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (2, 36)}


class FakeGrid:
    """Delivers each Message to ``sites[node]`` in-process; ``drop`` says which nodes go silent at which stage."""

    def __init__(self, sites: dict[int, Callable[[Message, Context], Message]]) -> None:
        self.sites = sites
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in sites}
        self.drop: dict[str, set[int]] = {}
        self.seen: list[Message] = []  # every reply the coordinator received
        self.requests: list[tuple[str, int]] = []  # (stage, node) of every message the coordinator sent

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            stage = _stage(message)
            self.requests.append((stage, node))
            if node in self.drop.get(stage, set()):
                continue
            incoming = Message(content=message.content, metadata=Metadata(
                run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=node, reply_to_message_id="",
                group_id="1", created_at=time.time(), ttl=600.0, message_type=message.metadata.message_type))
            reply = self.sites[node](incoming, self.contexts[node])
            self.seen.append(reply)
            replies.append(reply)
        return replies


def _stage(message: Message) -> str:
    record = message.content.config_records.get("secagg") if message.has_content() else None
    if message.metadata.message_type == "query.secagg":
        return str(record["stage"])
    return message.metadata.message_type


def _protocol_site(update: dict[str, np.ndarray], examples: int) -> Callable[[Message, Context], Message]:
    """A site that answers every stage with the real site code and 'trains' to global + ``update``."""

    def site(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "query.secagg":
            return Message(answer_stage(msg, context)[1], reply_to=msg)
        state = secure_round(msg, context, server_round=int(msg.content["config"].get("server-round", 1)))
        global_weights = msg.content["arrays"].to_torch_state_dict()
        weights = {k: v + torch.from_numpy(update[k]) for k, v in global_weights.items()}
        arrays = masked_update(state, context, weights=weights, global_weights=global_weights, num_examples=examples)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"epsilon": 1.0})}), reply_to=msg)

    return site


def _federation(seed: int = 0, shapes: dict = SHAPES) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    updates = {n: {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()} for n in NODES}
    examples = {n: int(rng.integers(20, 400)) for n in NODES}
    global_arrays = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()}
    return updates, examples, global_arrays


def _secure_round(grid: FakeGrid, global_arrays: dict, *, num_shares: int = 0, fraction: float = 0.6):
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=num_shares,
                                 threshold_fraction=fraction, timeout=None)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in global_arrays.items()})
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({}), grid))
    return strategy, strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("stage", ["none", "advertise", "share", "train", "unmask"])
@pytest.mark.parametrize("num_shares", [0, 3])
def test_secure_sum_equals_plain_fedavg_with_dropouts(flower_task_identity, stage, num_shares):
    updates, examples, global_arrays = _federation()
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    dropped = {NODES[1]} if stage != "none" else set()
    grid.drop[stage] = dropped
    strategy, (arrays, metrics) = _secure_round(grid, global_arrays, num_shares=num_shares)
    contributing = [n for n in NODES if n not in dropped or stage == "unmask"]
    total = sum(examples[n] for n in contributing)
    assert strategy.last_weight == total and metrics["epsilon"] == 1.0
    for name in SHAPES:
        plain = global_arrays[name] + sum(updates[n][name] * examples[n] for n in contributing) / total
        error = np.abs(arrays[name].numpy() - plain).max()
        assert error <= STEP, f"{name}: {error} above one quantization step {STEP}"


def _rounds(grid: FakeGrid, strategy: SecureAggregation, global_arrays: dict, examples: dict, updates: dict,
            drops: dict[int, dict[str, set[int]]]) -> list[list[tuple[str, int]]]:
    """Run rounds 1..len(drops) (``drops[r]``: who goes silent at which stage); each round's model is
    checked against plain FedAvg of the sites that trained. Returns each round's requests (stage, node)."""
    current, requests = dict(global_arrays), []
    for server_round, drop in drops.items():
        grid.drop, before = drop, len(grid.requests)
        arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in current.items()})
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        trained = [int(m.metadata.dst_node_id) for m in messages if int(m.metadata.dst_node_id) not in drop.get(
            "train", ())]
        secured, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        total = sum(examples[n] for n in trained)
        for name in SHAPES:
            plain = current[name] + sum(updates[n][name] * examples[n] for n in trained) / total
            assert np.abs(secured[name].numpy() - plain).max() <= STEP, f"round {server_round}, {name}"
        current = {k: secured[k].numpy() for k in SHAPES}
        requests.append(grid.requests[before:])
    return requests


def _count(requests: list[tuple[str, int]], stage: str) -> int:
    return sum(s == stage for s, _ in requests)


def test_from_round_two_a_secure_round_adds_one_exchange(flower_task_identity):
    """With every site sampled, the next round's keys and shares ride on this round's unmask exchange."""
    updates, examples, global_arrays = _federation(seed=3)
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    rounds = _rounds(grid, strategy, global_arrays, examples, updates, {1: {}, 2: {}, 3: {}})
    assert [(_count(r, "advertise"), _count(r, "share"), _count(r, "train"), _count(r, "unmask")) for r in rounds] \
        == [(5, 5, 5, 5), (0, 0, 5, 5), (0, 0, 5, 5)]
    states = [state_record["server_round"] for state_record in (
        grid.contexts[NODES[0]].state.config_records.get(slot) for slot in ("secagg", "secagg-later"))]
    assert states == [4, 5]  # a site holds two rounds' secrets: the next one shared, the one after advertised


def test_a_lost_reply_makes_the_next_round_exchange_keys_again(flower_task_identity):
    """A site whose unmask reply never arrives (round 1) or that drops out of training (round 3) shared no keys
    for the next round: that round falls back to advertise + share for every site (those that shared ahead
    make fresh keys), and the round after needs neither again."""
    updates, examples, global_arrays = _federation(seed=4)
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    rounds = _rounds(grid, strategy, global_arrays, examples, updates,
                     {1: {"unmask": {NODES[2]}}, 2: {}, 3: {"train": {NODES[4]}}, 4: {}, 5: {}})
    assert [(_count(r, "advertise"), _count(r, "share"), _count(r, "unmask")) for r in rounds] \
        == [(5, 5, 5), (5, 5, 5), (0, 0, 4), (5, 5, 5), (0, 0, 5)]


def test_with_a_sample_of_the_sites_keys_ride_on_the_unmask_reply(flower_task_identity):
    """When the strategy samples a subset, the next round's sample is unknown: only the keys are made ahead."""
    updates, examples, global_arrays = _federation(seed=5)
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    inner = FedAvg(fraction_train=0.8, min_train_nodes=4, min_available_nodes=5)
    strategy = SecureAggregation(inner=inner, params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    rounds = _rounds(grid, strategy, global_arrays, examples, updates, {1: {}, 2: {}, 3: {}})
    assert [(_count(r, "share"), _count(r, "train"), _count(r, "unmask")) for r in rounds] == [(4, 4, 4)] * 3
    sampled = [{n for s, n in r if s == "train"} for r in rounds]
    for previous, now, requests in zip(sampled, sampled[1:], rounds[1:]):  # only a newly sampled site advertises
        assert {n for s, n in requests if s == "advertise"} == now - previous


def test_below_the_threshold_the_round_is_not_aggregated_and_no_site_unmasks(flower_task_identity):
    updates, examples, global_arrays = _federation()
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    grid.drop["train"] = set(NODES[:3])  # 2 of 5 send an update; the threshold is ceil(0.6 * 5) = 3
    strategy, (arrays, metrics) = _secure_round(grid, global_arrays)
    assert (arrays, metrics) == (None, None)
    assert "2 site(s) sent a masked update, threshold 3" in strategy.last_outcome
    assert not [r for r in grid.seen if r.has_content() and "shares" in r.content.config_records.get("secagg", {})]


def test_what_the_coordinator_receives_is_masked(flower_task_identity):
    shapes = {**SHAPES, "fc.weight": (2, 4000)}  # 8040 values: chance correlation has sd 1/sqrt(8040) = 0.011
    updates, examples, global_arrays = _federation(seed=1, shapes=shapes)
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    _secure_round(grid, global_arrays)
    masked = [r for r in grid.seen if r.has_content() and "arrays" in r.content]
    assert len(masked) == len(NODES)
    for reply in masked:
        vector = reply.content["arrays"][MASKED_ARRAY].numpy()
        node = reply.metadata.src_node_id
        true = np.concatenate([updates[node][k].ravel() for k in shapes])
        assert vector.dtype == np.uint64 and vector.size == true.size + 1
        # masks are fresh every run: 0.06 is 5.4 sd of chance (a failure every ~10^7 runs); unmasked it would be ~1
        assert abs(np.corrcoef(vector[:-1].astype(np.float64), true)[0, 1]) < 0.06
        assert vector[-1] != examples[node]  # the example count travels masked too


def _advertised(node: int) -> tuple[SiteSecAgg, bytes, bytes]:
    return SiteSecAgg.start(node_id=node, server_round=1)


def _params(threshold: int) -> SecAggParams:
    return SecAggParams(**{**PARAMS.to_config(), "threshold": threshold})


def test_a_site_refuses_requests_that_would_unmask_it():
    sites = {n: _advertised(n) for n in (1, 2, 3, 4)}
    keys = {n: (a, b) for n, (_, a, b) in sites.items()}
    boxes: dict[int, dict[int, bytes]] = {}
    for node, (state, _, _) in sites.items():
        for dst, ctxt in state.share_keys({m: keys[m] for m in keys if m != node}, params=_params(3)).items():
            boxes.setdefault(dst, {})[node] = ctxt
    site = sites[1][0]
    site.receive(boxes[1])
    site.masked_vector(np.zeros(5, dtype=np.uint64))
    with pytest.raises(SecAggProtocolError, match="both"):
        site.unmask(active=[1, 2, 3], dropped=[2])
    with pytest.raises(SecAggProtocolError, match="below the threshold"):
        site.unmask(active=[1, 2], dropped=[3, 4])
    assert set(site.unmask(active=[1, 2, 3], dropped=[4])) == {1, 2, 3, 4}
    with pytest.raises(SecAggProtocolError, match="out of order"):  # one answer per round
        site.unmask(active=[1, 2, 3, 4], dropped=[])
    isolated, _, _ = _advertised(8)  # a hostile coordinator pairs a site with one other only
    with pytest.raises(SecAggProtocolError, match="at least 3"):
        isolated.share_keys({1: keys[1]}, params=_params(2))
    lax, _, _ = _advertised(9)
    with pytest.raises(SecAggProtocolError, match="more than half"):
        lax.share_keys({m: keys[m] for m in (1, 2, 3)}, params=_params(2))


def test_site_state_survives_a_fresh_process():
    state, _, _ = _advertised(10**19 + 3)
    assert SiteSecAgg.from_state_dict(ConfigRecord(state.state_dict())) == state  # before the parameters arrive
    peers = {n: SiteSecAgg.start(node_id=n, server_round=1)[1:] for n in (1, 2)}
    state.share_keys(peers, params=_params(2))
    again = SiteSecAgg.from_state_dict(ConfigRecord(state.state_dict()))
    assert again == state and set(again.channel_keys) == {1, 2} and again.params == _params(2)


def test_secagg_config_problems_name_the_unsafe_combinations():
    config = load_config(None, ["secagg.enabled=true", "strategy.name=krum", "central_dp.enabled=true",
                                "train.transfer_dtype=int8"])
    problems = secagg_config_problems(config)
    assert len(problems) == 3
    assert "strategy.name='krum'" in problems[0] and "robust aggregators" in problems[0]
    assert "central_dp.enabled=true" in problems[1]
    assert "train.transfer_dtype='int8'" in problems[2]
    assert secagg_config_problems(load_config(None, ["secagg.enabled=true", "strategy.name=fedadam"])) == []
    with pytest.raises(Exception, match="secagg.threshold"):
        load_config(None, ["secagg.threshold=0.5"])


def test_real_sites_train_under_secure_aggregation(flower_task_identity, tmp_path):
    """Three hospitals (site-name, data-dir, state-dir, policy requiring secagg) through the real ClientApp."""
    from conftest import RealSite

    from client.app import app as client_app

    sites = {}
    for node, name in ((11, "north"), (12, "south"), (10**19 + 1, "east")):
        site = RealSite(tmp_path / name)
        site.node_config["site-name"] = name
        site.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4, require_secagg=True)
        sites[node] = site
    run_config = next(iter(sites.values())).run_config("secagg.enabled=true")
    grid = FakeGrid({node: client_app for node in sites})
    for node, site in sites.items():
        grid.contexts[node] = Context(run_id=11, node_id=node, node_config=dict(site.node_config),
                                      state=RecordDict(), run_config=dict(run_config))
    global_weights = RealSite.weights(run_config)
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=0, threshold_fraction=0.67, timeout=None)
    messages = strategy.configure_train(1, ArrayRecord(global_weights), ConfigRecord({"run-name": "r"}), grid)
    replies = grid.send_and_receive(messages)
    for reply in replies:  # what the coordinator gets from training: one masked vector and DP metrics, no count
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert list(reply.content["arrays"].keys()) == [MASKED_ARRAY]
        assert "num-examples" not in reply.content["metrics"] and "epsilon" in reply.content["metrics"]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.last_weight == 3 * 128  # each site's 128 training images
    assert set(arrays.keys()) == set(global_weights)
    moved = max(float((arrays[k].numpy() - v.numpy()).__abs__().max()) for k, v in global_weights.items())
    assert 0 < moved < PARAMS.clipping_range
    audit = [json.loads(line) for line in (sites[11].state_dir / "north" / "audit.jsonl").read_text().splitlines()]
    stages = [(e["event"], e.get("stage"), e["round"], e["run_name"]) for e in audit]
    assert stages == [("secagg", "advertise", 1, "r"), ("secagg", "share", 1, "r"), ("train", None, 1, "r"),
                      ("secagg", "unmask", 1, "r")]  # every stage filed under the run and round it belongs to
    # The same site, asked for a plain round, refuses before training (its policy requires secure aggregation).
    plain = sites[11].train(node_config=sites[11].node_config)
    assert plain.content["status"]["refused"].startswith("secagg-required: ")


@pytest.mark.parametrize("inner_name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"])
def test_server_optimizers_get_the_same_model_from_the_secure_sum(flower_task_identity, inner_name):
    """Every strategy secure aggregation allows moves the global model from the mean update as from plain replies.

    Weights and updates lie on the quantization grid, so no element is rounded at random: adaptive optimizers
    (FedAdagrad: ``eta * m / (sqrt(v) + tau)``) amplify a rounding error in a near-zero mean update, which made
    this comparison fail about one run in 30 with random updates."""
    from strategies import build_strategy

    updates, examples, global_arrays = _federation(seed=2)
    on_grid = lambda a: (np.round(a / STEP) * STEP).astype(np.float32)  # noqa: E731 - exact in float32 (|a| < 2**8)
    updates = {n: {k: on_grid(v) for k, v in u.items()} for n, u in updates.items()}
    global_arrays = {k: on_grid(v) for k, v in global_arrays.items()}
    config = load_config(None, [f"strategy.name={inner_name}", "data.num_sites=5", "strategy.min_sites=5"])
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in global_arrays.items()})

    def build():
        return build_strategy(config.strategy, num_sites=5)

    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    secure = SecureAggregation(inner=build(), params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    secured, _ = secure.aggregate_train(1, grid.send_and_receive(secure.configure_train(1, arrays, ConfigRecord({}),
                                                                                       grid)))
    plain_strategy = build()
    plain_grid = FakeGrid({n: None for n in NODES})
    list(plain_strategy.configure_train(1, arrays, ConfigRecord({}), plain_grid))  # server optimizers keep the model
    total = sum(examples.values())
    mean = {k: global_arrays[k] + sum(updates[n][k] * examples[n] for n in NODES) / total for k in SHAPES}
    plain, _ = plain_strategy.aggregate_train(1, [_plain_reply(mean, total)])
    for name in SHAPES:
        assert np.abs(secured[name].numpy() - plain[name].numpy()).max() <= STEP / 100  # measured: <= 0.004 steps


def _plain_reply(weights: dict, examples: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=NODES[0], dst_node_id=1, reply_to_message_id="x",
        group_id="1", created_at=time.time(), ttl=600.0, message_type="train"))


def test_a_second_unmask_request_is_refused_even_after_the_next_rounds_keys(flower_task_identity):
    """A hostile coordinator asks again for round 1's shares (now naming a live site as dropped): refused."""
    updates, examples, global_arrays = _federation()
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    _secure_round(grid, global_arrays)
    node, victim = NODES[0], NODES[1]
    again = {"stage": "unmask", "round": 1, "next": 2, "active": [str(n) for n in NODES if n != victim],
             "dropped": [str(victim)]}
    request = Message(RecordDict({"secagg": ConfigRecord(again), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=node, message_type="query.secagg")
    stage, reply = answer_stage(request, grid.contexts[node])
    assert stage == "unmask" and "secagg" not in reply  # no shares, and no fresh keys either
    assert reply["status"]["refused"].startswith("secagg-protocol: ")
    assert "round 2" in reply["status"]["refused"]  # its round-1 secrets were replaced by round 2's keys


def test_a_hostile_share_step_sent_ahead_is_left_unanswered_and_the_unmask_still_is(flower_task_identity):
    """The next round's share step rides on the unmask request: one that would pair the site with a single
    neighbour (below the 3 holders a sum needs to hide a site) gets no shares, and changes nothing."""
    updates, examples, global_arrays = _federation()
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in global_arrays.items()})
    grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({}), grid))  # shared, then masked
    node, other = NODES[0], NODES[1]
    unmask = {"stage": "unmask", "round": 1, "active": [str(n) for n in NODES], "dropped": []}
    ahead = {"stage": "share", "round": 2, **_params(1).to_config(), "nids": [str(other)], "pk1s": [bytes(32)],
             "pk2s": [bytes(32)], "next": 3}
    request = Message(RecordDict({"secagg": ConfigRecord(unmask), "secagg-ahead": ConfigRecord(ahead),
                                  "config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                      message_type="query.secagg")
    stage, reply = answer_stage(request, grid.contexts[node])
    assert stage == "unmask" and set(reply.keys()) == {"secagg"}  # no shares for round 2, no keys for round 3
    assert len(reply["secagg"]["shares"]) == len(NODES)  # round 1 is still unmasked
    kept = [grid.contexts[node].state[slot] for slot in ("secagg", "secagg-later") if slot in grid.contexts[node].state]
    assert [(r["server_round"], r["stage"]) for r in kept] == [(2, "advertised")]  # round 2 can still be shared


def test_the_outbound_guard_lets_only_shares_and_keys_ride_ahead():
    """What a site sends in the next round's share step (the ``secagg-ahead`` record) passes the same guard."""
    from client.guard import OutboundViolation
    from client.secagg import check_stage_reply

    unmask = ConfigRecord({"nids": ["3"], "shares": [b"s"]})
    ahead = {"dsts": ["17"], "ctxts": [b"c"], "pk1": b"k" * 32, "pk2": b"k" * 32}
    assert check_stage_reply(RecordDict({"secagg": unmask, "secagg-ahead": ConfigRecord(ahead)}), stage="unmask")
    for extra in ({"loss": 0.3}, {"dsts": ["17"], "ctxts": ["a patient's name"]}):
        bad = RecordDict({"secagg": unmask, "secagg-ahead": ConfigRecord({**ahead, **extra})})
        with pytest.raises(OutboundViolation):
            check_stage_reply(bad, stage="unmask")
    with pytest.raises(OutboundViolation, match="carries"):  # only an unmask reply carries a share step ahead
        check_stage_reply(RecordDict({"secagg": ConfigRecord({"pk1": b"k", "pk2": b"k"}),
                                      "secagg-ahead": ConfigRecord(ahead)}), stage="advertise")


@pytest.mark.parametrize("ahead_round, later, answered", [(3, None, False), (2, 4, False), (2, 3, True)])
def test_a_share_step_ahead_for_another_round_or_keys_too_far_ahead_are_not_answered(
        flower_task_identity, ahead_round, later, answered):
    """Sent ahead with round 1's unmask: a share step for round 3 is left out (round 1 still unmasks); a share step
    asking for keys of round 4 (not its next round) is left out as well; the honest one (round 2, keys of 3) is not."""
    updates, examples, global_arrays = _federation()
    grid = FakeGrid({n: _protocol_site(updates[n], examples[n]) for n in NODES})
    strategy = SecureAggregation(inner=FedAvg(), params=PARAMS, num_shares=0, threshold_fraction=0.6, timeout=None)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in global_arrays.items()})
    grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({}), grid))
    node = NODES[0]
    others = [n for n in NODES if n != node]
    keys = strategy._keys[2]  # the neighbours' real round-2 keys, sent with their share replies of round 1
    ahead = {"stage": "share", "round": ahead_round, **_params(3).to_config(), "nids": [str(n) for n in others],
             "pk1s": [keys[n][0] for n in others], "pk2s": [keys[n][1] for n in others]}
    if later is not None:
        ahead["next"] = later
    unmask = {"stage": "unmask", "round": 1, "active": [str(n) for n in NODES], "dropped": []}
    request = Message(RecordDict({"secagg": ConfigRecord(unmask), "secagg-ahead": ConfigRecord(ahead),
                                  "config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                      message_type="query.secagg")
    stage, reply = answer_stage(request, grid.contexts[node])
    assert len(reply["secagg"]["shares"]) == len(NODES)  # round 1 is unmasked either way
    assert set(reply.keys()) == ({"secagg", "secagg-ahead"} if answered else {"secagg"})
    kept = [grid.contexts[node].state[slot] for slot in ("secagg", "secagg-later") if slot in grid.contexts[node].state]
    assert [(r["server_round"], r["stage"]) for r in kept] == (
        [(2, "shared"), (3, "advertised")] if answered else [(2, "advertised")])
