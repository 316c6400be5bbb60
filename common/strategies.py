"""The aggregation strategies a run may name, in one table.

The maths of each lives in Flower (``flwr.serverapp.strategy``); the ServerApp maps each
name to its class (fedpacs.server.strategies, checked against this table by a test). A
run config, the CLI's help and SecAgg+'s rules all read the names from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    summary: str
    sum_only: bool  # aggregates from the sum of the updates alone: allowed under SecAgg+


STRATEGY_TABLE: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("fedavg", "weighted mean of the updates (McMahan et al. 2017)", True),
    StrategyInfo("fedprox", "FedAvg with a proximal term at each site (needs proximal-mu)", True),
    StrategyInfo("fedadam", "server-side Adam on the mean update", False),
    StrategyInfo("fedmedian", "coordinate-wise median", False),
    StrategyInfo("fedtrimmedavg", "coordinate-wise trimmed mean (trimmed-beta)", False),
    StrategyInfo("krum", "the update closest to its neighbours (krum-malicious)", False),
)}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGY_TABLE)
SECAGG_STRATEGIES: tuple[str, ...] = tuple(n for n, s in STRATEGY_TABLE.items() if s.sum_only)
