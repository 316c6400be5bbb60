"""Server-side checks on each update before aggregation, and on every aggregate.

A site's update must have the model's keys, shapes and dtypes, hold only finite values
and, when ``max-update-norm`` is set, lie within that L2 distance of the round's global
model. A bad update is dropped with its reason logged (and kept in the round record); the
round goes on with the others. Under SecAgg+ single updates are never visible, so only
the aggregate is checked here (each site checks its own update before masking it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from fedpacs.common import wire
from fedpacs.common.errors import FieldError, UpdateError
from fedpacs.server.recorder import RoundRecorder, site_name

log = logging.getLogger("fedpacs.server")


def check_update(model: nn.Module, update: dict[str, np.ndarray], *, max_norm: float
                 ) -> list[FieldError]:
    """Every problem of one update against the current global ``model`` (empty: fine)."""
    reference = model.state_dict()
    errors = wire.check_state(reference, update)
    if not errors and max_norm > 0:
        norm = wire.update_norm(update, reference)
        if norm > max_norm:
            errors.append(FieldError("update norm", f"<= max-update-norm {max_norm:g}",
                                     f"{norm:.4g}", "lower the site's learning rate or "
                                     "epochs, or raise max-update-norm"))
    return errors


def screen_aggregate(model: nn.Module, values: list[np.ndarray], *, max_norm: float
                     ) -> ArrayRecord:
    """A SecAgg+ aggregate (arrays in state_dict order) checked and named, or UpdateError:
    count, shapes, dtypes and finite values in :func:`wire.from_numpy_list`, then the bound."""
    named = wire.from_numpy_list(model, values)
    if max_norm > 0:
        errors = check_update(model, wire.arrays_to_numpy(named), max_norm=max_norm)
        if errors:
            raise UpdateError(errors)
    return named


class ScreenedStrategy:
    """Mixin for a ``flwr.serverapp.strategy`` class: drop bad updates before the
    strategy aggregates. ``model`` must hold the round's global weights."""

    screen_model: nn.Module
    screen_max_norm: float
    screen_recorder: RoundRecorder

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept: list[Message] = []
        rejected: dict[str, str] = {}
        for i, reply in enumerate(replies):
            if reply.has_error():
                kept.append(reply)  # the strategy logs and skips error replies
                continue
            site = site_name(reply.content, int(reply.metadata.src_node_id) or i)
            arrays = reply.content.array_records.get(wire.ARRAYS_KEY)
            errors = ([FieldError("arrays", "an ArrayRecord", "none", "send the weights")]
                      if arrays is None else
                      check_update(self.screen_model, wire.arrays_to_numpy(arrays),
                                   max_norm=self.screen_max_norm))
            if errors:
                reason = str(UpdateError(errors))
                log.error("round %d: update from %s dropped: %s", server_round, site, reason)
                rejected[site] = reason
                continue
            kept.append(reply)
            if arrays is not None:  # a copy: some strategies (FedMedian) pop arrays as they go
                self.screen_recorder.local_models[site] = ArrayRecord(
                    {k: arrays[k] for k in arrays.keys()})
        result: tuple[ArrayRecord | None, MetricRecord | None] = \
            super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if rejected:
            self.screen_recorder.pending["rejected"] = rejected
        return result


def screened(cls: type, model: nn.Module, max_norm: float, recorder: RoundRecorder,
             **kwargs: Any) -> Any:
    """An instance of strategy ``cls`` with :class:`ScreenedStrategy` in front of it."""
    sub = type(f"Screened{cls.__name__}", (ScreenedStrategy, cls), {})
    obj = sub(**kwargs)
    obj.screen_model, obj.screen_max_norm, obj.screen_recorder = model, max_norm, recorder
    return obj

