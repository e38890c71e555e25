"""A site's side of one secure-aggregation round.

Four steps make up a site's part of a round, in order (the first two usually arrive with the
previous round's unmask request):

1. **advertise**: make two fresh key pairs and a self-mask seed; send the public keys.
   After round 1 this step rides on an earlier reply (a share or unmask reply also
   carries a later round's fresh keys), which saves a message round trip.
2. **share** (with the round's parameters): given its neighbours' public keys, split
   the self-mask seed and the masking private key into Shamir shares (``threshold``
   of ``holders``), encrypt each neighbour's pair of shares for it, and send the
   ciphertexts (the coordinator routes them; it cannot read them). After round 1 this
   step usually rides on the previous round's unmask exchange.
3. **train** (with the ciphertexts addressed to this site): train, then send the update
   quantized, weighted and masked (:meth:`SiteSecAgg.masked_vector`).
4. **unmask**: given which sites sent a masked update and which dropped out, send the
   self-mask shares of the first and the masking-key shares of the second, **once**.

Every request that would let the coordinator learn more than the sum is refused with
:class:`SecAggProtocolError`: too few holders or survivors for the threshold, a site
named both alive and dropped, nodes that were never this site's neighbours, a second
unmask request in the same round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from federation.flower_internals import (
    create_shares,
    decrypt,
    encrypt,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from federation.secagg import keys
from federation.secagg.params import SecAggParams
from federation.secagg.vectors import prg_mask


#: Fewest sites (this one included) a site shares its secrets with and masks against.
MIN_HOLDERS = 3


class SecAggProtocolError(ValueError):
    """A secure-aggregation request the site must not answer (the reason is safe to send)."""


def mask_sign(own: int, peer: int) -> int:
    """+1 when ``own`` adds the pairwise mask it shares with ``peer``, -1 when it subtracts it."""
    return 1 if peer > own else -1


@dataclass
class SiteSecAgg:
    """One site's secrets and what it has seen in one round (kept in Flower's Context.state).

    Build with :meth:`start`; every later step checks that it comes in order.
    """

    node_id: int
    server_round: int
    channel_private: bytes  # raw X25519 (never shared)
    mask_private: bytes  # raw X25519 (Shamir-shared)
    self_seed: bytes  # 15 bytes: the self mask's AES key derives from it (Shamir-shared)
    params: SecAggParams | None = None  # set by the share request
    stage: str = "advertised"
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (channel pk, mask pk)
    channel_keys: dict[int, bytes] = field(default_factory=dict)  # node -> symmetric key of the shares' channel
    own_shares: tuple[bytes, bytes] = (b"", b"")  # this site's share of its own (seed, mask key)
    received: dict[int, bytes] = field(default_factory=dict)  # source node -> ciphertext addressed here

    @classmethod
    def start(cls, *, node_id: int, server_round: int) -> tuple[SiteSecAgg, bytes, bytes]:
        """Stage 1: fresh key pairs and self-mask seed; returns the state and the two public keys."""
        channel, mask = keys.new_private_key(), keys.new_private_key()
        state = cls(node_id=node_id, server_round=server_round, channel_private=channel, mask_private=mask,
                    self_seed=keys.new_self_seed())
        return state, keys.public_key(channel), keys.public_key(mask)

    def share_keys(self, neighbours: Mapping[int, tuple[bytes, bytes]], *, params: SecAggParams) -> dict[int, bytes]:
        """Stage 2: encrypted shares of the self-mask seed and the masking key, one ciphertext per neighbour."""
        self._expect("advertised")
        if self.node_id in neighbours:
            raise SecAggProtocolError("the neighbour list names this site itself")
        holders = [self.node_id, *sorted(neighbours)]
        self.params = params
        problems = params.check(num_sites=len(holders), holders=len(holders))
        if len(holders) < MIN_HOLDERS:
            problems.append(f"{len(holders)} share holders: at least {MIN_HOLDERS} are needed for a sum to hide a site")
        if problems:
            raise SecAggProtocolError("; ".join(problems))
        seed_shares = create_shares(self.self_seed, params.threshold, len(holders))
        key_shares = create_shares(self.mask_private, params.threshold, len(holders))
        out: dict[int, bytes] = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares):
            if holder == self.node_id:
                self.own_shares = (seed_share, key_share)
                continue
            channel_pk, _ = neighbours[holder]
            self.channel_keys[holder] = keys.channel_key(self.channel_private, channel_pk)  # kept for unmasking
            plaintext = share_keys_plaintext_concat(self.node_id, holder, seed_share, key_share)
            out[holder] = encrypt(self.channel_keys[holder], plaintext)
        self.neighbours = {int(node): (bytes(a), bytes(b)) for node, (a, b) in neighbours.items()}
        self.stage = "shared"
        return out

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Stage 3a: keep the shares the neighbours that completed stage 2 sent this site."""
        self._expect("shared")
        strangers = set(ciphertexts) - set(self.neighbours)
        if strangers:
            raise SecAggProtocolError(f"{len(strangers)} ciphertext(s) from sites that are not neighbours")
        if len(ciphertexts) + 1 < self.threshold:
            raise SecAggProtocolError(
                f"only {len(ciphertexts) + 1} share holders left, below the threshold {self.threshold}"
            )
        self.received = {int(node): bytes(ctxt) for node, ctxt in ciphertexts.items()}
        self.stage = "received"

    def masked_vector(self, vector: np.ndarray) -> np.ndarray:
        """Stage 3b: ``vector`` (uint64) plus the self mask and the pairwise masks (mod 2**64)."""
        self._expect("received")
        masked = vector.astype(np.uint64, copy=True)
        masked += prg_mask(keys.self_mask_key(self.self_seed), masked.size)
        for peer in self.received:
            mask = prg_mask(keys.mask_seed(self.mask_private, self.neighbours[peer][1]), masked.size)
            if mask_sign(self.node_id, peer) > 0:
                masked += mask
            else:
                masked -= mask
        self.stage = "masked"
        return masked

    def unmask(self, *, active: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """Stage 4: the self-mask share of every ``active`` site and the masking-key share of every dropped one."""
        self._expect("masked")
        active_set, dropped_set = {int(n) for n in active}, {int(n) for n in dropped}
        if active_set & dropped_set:
            raise SecAggProtocolError("a site is named both as having sent its update and as dropped out")
        if self.node_id not in active_set:
            raise SecAggProtocolError("this site sent its update but is not named among the active sites")
        known = set(self.received) | {self.node_id}
        if not (active_set | dropped_set) <= known:
            raise SecAggProtocolError("unmask names sites that did not share keys with this site")
        if len(active_set) < self.threshold:
            raise SecAggProtocolError(f"{len(active_set)} active sites, below the threshold {self.threshold}")
        self.stage = "unmasked"  # one answer per round, whatever follows
        shares: dict[int, bytes] = {self.node_id: self.own_shares[0]}
        for source, ciphertext in self.received.items():
            if source not in active_set and source not in dropped_set:
                continue
            plaintext = decrypt(self.channel_keys[source], ciphertext)
            src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
            if (src, dst) != (source, self.node_id):
                raise SecAggProtocolError("a ciphertext's sender or addressee does not match its route")
            shares[source] = seed_share if source in active_set else key_share
        return shares

    @property
    def threshold(self) -> int:
        """The round's reconstruction threshold (known from the share request on)."""
        if self.params is None:
            raise SecAggProtocolError("the round's parameters have not arrived (no share request yet)")
        return self.params.threshold

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggProtocolError(f"secure aggregation step out of order: at {self.stage!r}, expected {stage!r}")

    def state_dict(self) -> dict[str, Any]:
        """The state as scalars, bytes and lists (fits a Flower ConfigRecord)."""
        nodes = sorted(self.neighbours)
        received = sorted(self.received)
        params = {} if self.params is None else self.params.to_config()
        return {
            "node_id": str(self.node_id), "server_round": self.server_round, "stage": self.stage,
            **{f"param_{k}": v for k, v in params.items()},
            "channel_private": self.channel_private, "mask_private": self.mask_private,
            "self_seed": self.self_seed, "own_seed_share": self.own_shares[0], "own_key_share": self.own_shares[1],
            "neighbour_ids": [str(n) for n in nodes],
            "neighbour_channel_pks": [self.neighbours[n][0] for n in nodes],
            "neighbour_mask_pks": [self.neighbours[n][1] for n in nodes],
            "channel_key_ids": [str(n) for n in sorted(self.channel_keys)],
            "channel_keys": [self.channel_keys[n] for n in sorted(self.channel_keys)],
            "received_ids": [str(n) for n in received], "received_ciphertexts": [self.received[n] for n in received],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SiteSecAgg:
        """Rebuild the state saved by :meth:`state_dict` (node ids travel as strings: they exceed int64)."""
        saved = {k[len("param_"):]: v for k, v in state.items() if k.startswith("param_")}
        params = SecAggParams.from_config(saved) if saved else None
        ids = [int(n) for n in state.get("neighbour_ids", [])]
        return cls(
            node_id=int(state["node_id"]), server_round=int(state["server_round"]), params=params,
            channel_private=bytes(state["channel_private"]), mask_private=bytes(state["mask_private"]),
            self_seed=bytes(state["self_seed"]), stage=str(state["stage"]),
            neighbours=dict(zip(ids, zip(state.get("neighbour_channel_pks", []), state.get("neighbour_mask_pks", [])))),
            own_shares=(bytes(state.get("own_seed_share", b"")), bytes(state.get("own_key_share", b""))),
            channel_keys=dict(zip([int(n) for n in state.get("channel_key_ids", [])],
                                  [bytes(k) for k in state.get("channel_keys", [])])),
            received=dict(zip([int(n) for n in state.get("received_ids", [])], state.get("received_ciphertexts", []))),
        )
