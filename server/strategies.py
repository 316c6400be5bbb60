"""Aggregation strategies by name, all from ``flwr.serverapp.strategy``.

The maths of each lives in Flower; fedpacs only chooses one from the run config and hooks
the per-site metric recorder into it. FedBN is a client option (normalisation layers stay
local) that composes with any of these.
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

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.server.recorder import RoundRecorder


def _common(cfg: RunConfig, rec: RoundRecorder) -> dict[str, Any]:
    return {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": cfg.min_sites,
            "min_evaluate_nodes": cfg.min_sites, "min_available_nodes": cfg.min_sites,
            "weighted_by_key": wire.NUM_EXAMPLES, "arrayrecord_key": wire.ARRAYS_KEY,
            "configrecord_key": wire.CONFIG_KEY, "train_metrics_aggr_fn": rec.aggregate_train,
            "evaluate_metrics_aggr_fn": rec.aggregate_evaluate}


STRATEGIES: dict[str, Callable[[RunConfig, RoundRecorder], Strategy]] = {
    "fedavg": lambda c, r: FedAvg(**_common(c, r)),
    "fedprox": lambda c, r: FedProx(**_common(c, r), proximal_mu=c.proximal_mu),
    "fedadam": lambda c, r: FedAdam(**_common(c, r), eta=c.server_lr, eta_l=c.lr),
    "fedmedian": lambda c, r: FedMedian(**_common(c, r)),
    "fedtrimmedavg": lambda c, r: FedTrimmedAvg(**_common(c, r), beta=c.trimmed_beta),
    "krum": lambda c, r: Krum(**_common(c, r), num_malicious_nodes=c.krum_malicious),
}


def make_strategy(cfg: RunConfig, recorder: RoundRecorder) -> Strategy:
    """The run's strategy; ``cfg`` was validated (RunConfig.validate) before."""
    return STRATEGIES[cfg.strategy](cfg, recorder)
