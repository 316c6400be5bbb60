"""Aggregation strategies by name, all from ``flwr.serverapp.strategy``.

The maths of each lives in Flower; fedpacs only chooses one from the run config and hooks
the per-site metric recorder into it. FedBN is a client option (normalisation layers stay
local) that composes with any of these.

No strategy sends evaluate messages during the rounds: each site evaluates the global
model it receives before training and folds that into its train reply (one exchange per
round), and the ServerApp evaluates the final model once after the last round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from torch import nn

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
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


def make_strategy(cfg: RunConfig, recorder: RoundRecorder, model: nn.Module | None = None
                  ) -> Strategy:
    """The run's strategy (``cfg`` was validated before). With ``model`` (holding each
    round's global weights) every update is checked before aggregation and a bad one is
    dropped (fedpacs.server.screening)."""
    cls, own = STRATEGIES[cfg.strategy]
    inner = cls(**(_common(cfg, recorder) | own(cfg)))
    if model is None:
        return inner
    return ScreenedStrategy(inner, model=model, max_norm=cfg.max_update_norm,
                            max_weight=cfg.secagg_max_weight, recorder=recorder)
