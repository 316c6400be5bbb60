"""Server-side checks on each update before aggregation, and on every aggregate.

A site's update must have the model's keys, shapes and dtypes, hold only finite values
and, when ``max-update-norm`` is set, lie within that L2 distance of the round's global
model. A bad update is dropped with its reason logged (and kept in the round record); the
round goes on with the others. Under SecAgg+ single updates are never visible, so only
the aggregate is checked here (each site checks its own update before masking it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedpacs.common import wire
from fedpacs.common.errors import FieldError, UpdateError
from fedpacs.server.recorder import RoundRecorder, site_name

log = logging.getLogger("fedpacs.server")


def check_update(reference: dict[str, torch.Tensor], update: dict[str, np.ndarray], *,
                 max_norm: float) -> list[FieldError]:
    """Every problem of one update against the global model's state (empty: fine)."""
    errors = wire.check_state(reference, update)
    if not errors and max_norm > 0:
        norm = wire.update_norm(update, reference)
        if norm > max_norm:
            errors.append(FieldError("update norm", f"<= max-update-norm {max_norm:g}",
                                     f"{norm:.4g}", "lower the site's learning rate or "
                                     "epochs, or raise max-update-norm"))
    return errors


def packed_format(arrays: ArrayRecord) -> list[FieldError]:
    """Every update of a round must come packed, as the global model went out: the
    strategy averages entry by entry, and one reply of another layout would stop it."""
    if wire.is_packed(arrays):
        return []
    return [FieldError("arrays", f"the model's state packed under {wire.PACKED_KEY!r}",
                       f"{len(arrays)} named arrays", "run the same fedpacs version on the "
                       "server and the site")]


def check_reply_arrays(arrays: ArrayRecord | None, reference: dict[str, torch.Tensor], *,
                       max_norm: float) -> list[FieldError]:
    """Every problem of one reply's ArrayRecord (empty: fine): none at all, not packed, a
    packed vector that is not the model's (size or type), or :func:`check_update`'s."""
    if arrays is None:
        return [FieldError("arrays", "an ArrayRecord", "none", "send the weights")]
    errors = packed_format(arrays)
    if errors:
        return errors
    try:
        update = wire.arrays_to_numpy(arrays, reference)
    except UpdateError as exc:  # one site's vector of the wrong size drops that site only
        return list(exc.errors)
    return check_update(reference, update, max_norm=max_norm)


def check_weight(num_examples: object, *, max_weight: float) -> list[FieldError]:
    """A site's self-reported weight must be a whole number of examples in 1..max_weight:
    one site claiming 1e12 would otherwise replace the global model."""
    ok = isinstance(num_examples, int | float) and not isinstance(num_examples, bool) \
        and math.isfinite(num_examples) and float(num_examples).is_integer() \
        and 0 < num_examples <= max_weight
    if ok:
        return []
    return [FieldError("num-examples", f"a whole number of examples in 1..{max_weight:g} "
                       "(the run's max-weight)", repr(num_examples),
                       "the site reports its real training-sample count; raise "
                       "--secagg-max-weight if a site really has more")]


def screen(replies: Iterable[Message], reference: dict[str, torch.Tensor], *, max_norm: float,
           max_weight: float) -> tuple[list[Message], dict[str, str]]:
    """Split a round's train replies into those to aggregate and the rejected ones
    (site -> reason): wrong keys/shapes/dtypes, NaN/Inf, too far from the global model, or a
    weight outside 1..max_weight. Error replies are kept: the strategy logs and skips them.
    Pure: the replies and the reference are not changed."""
    kept: list[Message] = []
    rejected: dict[str, str] = {}
    for i, reply in enumerate(replies):
        if reply.has_error():
            kept.append(reply)
            continue
        site = site_name(reply.content, int(reply.metadata.src_node_id) or i)
        arrays = reply.content.array_records.get(wire.ARRAYS_KEY)
        errors = check_reply_arrays(arrays, reference, max_norm=max_norm)
        metrics = reply.content.metric_records.get(wire.METRICS_KEY)
        errors += check_weight(metrics.get(wire.NUM_EXAMPLES) if metrics is not None else None,
                               max_weight=max_weight)
        if errors:
            rejected[site] = str(UpdateError(errors))
            continue
        kept.append(reply)
    return kept, rejected


def screen_aggregate(model: nn.Module, values: list[np.ndarray], *, max_norm: float
                     ) -> ArrayRecord:
    """A SecAgg+ aggregate (arrays in state_dict order) checked and named, or UpdateError:
    count, shapes, dtypes and finite values in :func:`wire.from_numpy_list`, then the bound."""
    named = wire.from_numpy_list(model, values)
    if max_norm > 0:
        reference = model.state_dict()
        errors = check_update(reference, wire.arrays_to_numpy(named, reference),
                              max_norm=max_norm)
        if errors:
            raise UpdateError(errors)
    return named


class ScreenedStrategy(Strategy):
    """A Flower strategy with the update screen in front of its ``aggregate_train``: bad
    updates are dropped (and recorded) before ``inner`` sees them. ``model`` holds the
    round's global weights (the run loads each new global model into it).

    ``round_offset`` is added to every round number Flower's loop passes (it counts from
    1): a run resumed after round k runs Flower's rounds 1.. as the run's rounds k+1..,
    so the sites' instructions (``server-round``) and the inner strategy's arithmetic
    (FedAdam's bias correction) see the run's true round numbers."""

    def __init__(self, inner: Strategy, *, model: nn.Module, max_norm: float,
                 max_weight: float, recorder: RoundRecorder, round_offset: int = 0,
                 round_config: Callable[[int], ConfigRecord] | None = None) -> None:
        self.inner = inner
        self.model = model
        self.max_norm = max_norm
        self.max_weight = max_weight
        self.recorder = recorder
        self.round_offset = round_offset
        # the instructions of each (true) round number: Flower's loop sends the one config
        # it was started with every round, so a learning-rate schedule would never move
        self.round_config = round_config

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.round_config is not None:
            config = self.round_config(server_round)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        kept, rejected = screen(replies, self.model.state_dict(), max_norm=self.max_norm,
                                max_weight=self.max_weight)
        for site, reason in rejected.items():
            log.error("round %d: update from %s dropped: %s", server_round, site, reason)
        self.recorder.reject(rejected)
        for i, reply in enumerate(kept):
            arrays = None if reply.has_error() else reply.content.array_records.get(
                wire.ARRAYS_KEY)
            if arrays is not None:
                self.recorder.keep_local_model(
                    site_name(reply.content, int(reply.metadata.src_node_id) or i), arrays)
        # aggregated in one order whatever order the replies arrived in (a float sum
        # depends on it): by site name, then node id; so a run repeated with the same seed,
        # deployed, simulated or over the loopback grid, gives the same weights to the bit
        kept = sorted(kept, key=lambda r: ("" if r.has_error() else site_name(
            r.content, int(r.metadata.src_node_id)), int(r.metadata.src_node_id)))
        return self.inner.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config,
                                             grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    def summary(self) -> None:
        flwr_log(logging.INFO, "Strategy %s, each update screened by fedpacs first",
                 type(self.inner).__name__)
        self.inner.summary()
