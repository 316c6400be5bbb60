"""Aggregation strategies by name, all from ``flwr.serverapp.strategy``.

The maths of each lives in Flower; fedpacs only chooses one from the run config and hooks
the per-site metric recorder into it. FedBN is a client option (normalisation layers stay
local) that composes with any of these.

No strategy sends evaluate messages during the rounds: each site evaluates the global
model it receives before training and folds that into its train reply (one exchange per
round), and the ServerApp evaluates the final model once after the last round.

What a strategy carries from one round to the next beyond the global model
(:func:`strategy_state`: FedAdam's first and second moments; the others have none) is
checkpointed with every round and put back when a run resumes (:func:`restore_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from torch import nn

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import DataError
from fedpacs.server.recorder import RoundRecorder
from fedpacs.server.screening import ScreenedStrategy


def _common(cfg: RunConfig, rec: RoundRecorder) -> dict[str, Any]:
    return {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": cfg.min_sites,
            "min_evaluate_nodes": 0, "min_available_nodes": cfg.min_sites,
            "weighted_by_key": wire.NUM_EXAMPLES, "arrayrecord_key": wire.ARRAYS_KEY,
            "configrecord_key": wire.CONFIG_KEY, "train_metrics_aggr_fn": rec.aggregate_train,
            "evaluate_metrics_aggr_fn": rec.aggregate_evaluate}


# name -> (Flower strategy class, its own keyword arguments from the run config); the
# names are those of fedpacs.common.strategies.STRATEGY_TABLE (a test checks both agree)
STRATEGIES: dict[str, tuple[type[Strategy], Callable[[RunConfig], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda c: {}),
    "fedprox": (FedProx, lambda c: {"proximal_mu": c.proximal_mu}),
    "fedadam": (FedAdam, lambda c: {"eta": c.server_lr, "eta_l": c.lr}),
    "fedmedian": (FedMedian, lambda c: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda c: {"beta": c.trimmed_beta}),
    "krum": (Krum, lambda c: {"num_malicious_nodes": c.krum_malicious}),
}


def make_strategy(cfg: RunConfig, recorder: RoundRecorder, model: nn.Module | None = None,
                  *, round_offset: int = 0) -> Strategy:
    """The run's strategy (``cfg`` was validated before). With ``model`` (holding each
    round's global weights) every update is checked before aggregation and a bad one is
    dropped (fedpacs.server.screening); ``round_offset`` (a resumed run: its last
    completed round) is added to the round numbers Flower's loop counts from 1."""
    cls, own = STRATEGIES[cfg.strategy]
    inner = cls(**(_common(cfg, recorder) | own(cfg)))
    if model is None:
        return inner
    return ScreenedStrategy(inner, model=model, max_norm=cfg.max_update_norm,
                            max_weight=cfg.secagg_max_weight, recorder=recorder,
                            round_offset=round_offset, round_config=lambda r: (
                                RoundInstructions.for_round(cfg, r, evaluate_first=True)
                                .to_record()))


# FedOpt's (FedAdam's) moments, each a dict of arrays keyed like the global model's record
MOMENTS = ("m_t", "v_t")


def _inner(strategy: Strategy) -> Strategy:
    return strategy.inner if isinstance(strategy, ScreenedStrategy) else strategy


def strategy_state(strategy: Strategy | None) -> dict[str, torch.Tensor]:
    """What ``strategy`` carries into the next round beyond the global model, as tensors
    named ``MOMENT/KEY`` (FedAdam: ``m_t`` and ``v_t`` once it has aggregated; {} for
    the others). FedOpt's ``current_arrays`` are not kept: each round's
    ``configure_train`` sets them from the global model it sends."""
    inner = _inner(strategy) if strategy is not None else None
    if not isinstance(inner, FedOpt):
        return {}
    out: dict[str, torch.Tensor] = {}
    for moment in MOMENTS:
        for key, value in (getattr(inner, moment) or {}).items():
            out[f"{moment}/{key}"] = torch.from_numpy(np.array(value, copy=True))
    return out


def restore_state(strategy: Strategy, state: dict[str, torch.Tensor], *, source: str
                  ) -> None:
    """Put back what :func:`strategy_state` saved (a resumed run); DataError naming
    ``source`` when the state does not belong to this strategy."""
    inner = _inner(strategy)
    moments: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in state.items():
        moment, _, key = name.partition("/")
        if moment not in MOMENTS or not key or not isinstance(inner, FedOpt):
            raise DataError(source, f"strategy state {name!r} is not one that "
                            f"{type(inner).__name__} keeps", "resume the run with the "
                            "strategy it was started with", kind="foreign-strategy-state")
        moments.setdefault(moment, {})[key] = tensor.numpy().copy()
    for moment, values in moments.items():
        setattr(inner, moment, values)
