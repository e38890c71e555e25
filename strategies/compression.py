"""Server side of quantized update transfer (``train.transfer_dtype``): decode before aggregating.

Sites configured with ``train.transfer_dtype=fp16`` or ``int8`` send the
quantized difference between their trained weights and the global weights they
received (:func:`federation.compression.encode_update`).
:class:`TransferDecodingStrategy` remembers the global arrays of the round in
``configure_train`` and, in ``aggregate_train``, replaces every valid reply's
arrays by the full weights (:func:`federation.compression.decode_update`) before
the wrapped strategy aggregates, so any strategy works unchanged. Replies in
plain fp32 are passed through as they are (the encoding is read off the arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.compression import TRANSFER_DTYPES, decode_update
from strategies.streaming import array_view
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)


class TransferDecodingStrategy(StrategyWrapper):
    """Decode quantized site updates into full weights for the wrapped strategy.

    Args:
        inner: The strategy that aggregates the decoded weights.
        transfer_dtype: What the sites send (``fp16`` or ``int8``); logged, the
            decoding itself follows each reply's arrays.
    """

    def __init__(self, *, inner: Strategy, transfer_dtype: str) -> None:
        super().__init__(inner=inner)
        if transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"train.transfer_dtype must be one of {', '.join(TRANSFER_DTYPES)}, got {transfer_dtype!r}")
        self.transfer_dtype = transfer_dtype
        self._reference: dict | None = None

    def summary(self) -> None:
        """Log the transfer encoding, then the inner strategy's summary."""
        logger.info("TransferDecodingStrategy: sites send %s updates", self.transfer_dtype)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember this round's global arrays (the decoding reference), then delegate."""
        self._reference = {name: array.numpy() for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply that carries arrays, then delegate.

        Raises:
            RuntimeError: If replies arrive before ``configure_train`` set the reference.
            ValueError: If a reply's arrays do not fit the global model.
        """
        replies = list(replies)
        for message in replies:
            if message.has_error() or not message.has_content() or "arrays" not in message.content:
                continue
            if self._reference is None:
                raise RuntimeError("TransferDecodingStrategy got train replies before configure_train")
            record = message.content["arrays"]
            encoded = {name: array_view(array) for name, array in record.items()}
            try:
                decoded = decode_update(encoded, self._reference)
            except ValueError as error:
                raise ValueError(f"round {server_round}, node {message.metadata.src_node_id}: {error}") from error
            message.content["arrays"] = ArrayRecord({name: Array(value) for name, value in decoded.items()})
        return super().aggregate_train(server_round, replies)


def with_transfer_decoding(strategy: Strategy, *, transfer_dtype: str) -> Strategy:
    """Wrap ``strategy`` in :class:`TransferDecodingStrategy` unless sites send plain fp32 weights."""
    if transfer_dtype == "fp32":
        return strategy
    return TransferDecodingStrategy(inner=strategy, transfer_dtype=transfer_dtype)
