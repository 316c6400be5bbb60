"""Rounds under SecAgg+ (the default): the server only ever sees the sum of the updates.

Flower 1.41 has SecAgg+ on its legacy API only: ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit stage and a legacy ``FedAvg``. The sites' ``secaggplus_mod``
quantises ``num_examples / max_weight * weights``, adds pairwise and private masks, and
the workflow unmasks only the sum, from which it divides out the total weight: FedAvg's
weighted mean without any single update being visible. A site that drops out after the
key exchange has its masks rebuilt from the shares its neighbours hold (``threshold``).

A round is the four SecAgg+ exchanges and nothing more: each site evaluates the global
model it receives before training and sends those metrics in the clear beside its masked
update (``FitRes.metrics``, as the training metrics always were), so the workflow's
evaluate stage only closes the round (fedpacs' end-of-round bookkeeping). The final
model's evaluation is the ServerApp's one evaluate exchange after the last round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from torch import nn

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import UpdateError
from fedpacs.server.recorder import RoundRecorder
from fedpacs.server.screening import check_weight, screen_aggregate

log = logging.getLogger("fedpacs.server")

QUANTIZATION_RANGE = 2**24  # 16.7M levels over [-clip, clip]
MODULUS_RANGE = 2**32  # sums of up to 256 sites fit without overflow

EndOfRound = Callable[[int, ArrayRecord], MetricRecord]


class DeadlineClientManager(SimpleClientManager):
    """Waits for sites at most ``timeout_s`` (Flower's default is a day)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        ok = super().wait_for(num_clients, timeout=int(min(timeout, self.timeout_s)))
        if not ok:
            log.error("fewer than %d sites online after %.0fs: round skipped", num_clients,
                      self.timeout_s)
        return ok


class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg whose ``aggregate_fit`` receives the SecAgg+ aggregate: it checks it
    (shapes, dtypes, finite, norm bound) and keeps per-site metrics (sent in the clear)."""

    def __init__(self, cfg: RunConfig, model: nn.Module, recorder: RoundRecorder, *,
                 initial: ArrayRecord, round_offset: int = 0) -> None:
        """``initial``: the global model to start from;
        ``round_offset`` (a resumed run: its last completed round) is added to the round
        numbers the workflow counts from 1, in the sites' instructions and the logs."""
        self.cfg, self.model, self.recorder = cfg, model, recorder
        self.sampled = 0
        self.round_offset = round_offset
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_sites,
            min_evaluate_clients=cfg.min_sites, min_available_clients=cfg.min_sites,
            initial_parameters=ndarrays_to_parameters(wire.to_numpy_list(initial)),
            on_fit_config_fn=lambda r: RoundInstructions.for_round(
                cfg, r + round_offset, evaluate_first=True).to_dict(),
            accept_failures=True)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        chosen = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = len(chosen)
        return chosen

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        server_round += self.round_offset
        records = []
        for _, res in results:
            metrics: dict[str, Any] = {k: v for k, v in res.metrics.items()
                                       if isinstance(v, int | float)}
            records.append(RecordDict({
                wire.METRICS_KEY: MetricRecord(metrics | {wire.NUM_EXAMPLES: res.num_examples}),
                wire.SITE_KEY: ConfigRecord({"name": str(res.metrics.get("site", ""))})}))
        agg = self.recorder.aggregate_train(records, wire.NUM_EXAMPLES)
        # each site sent one masked vector the size of the model
        self.recorder.secagg_sum(len(results), self.sampled - len(results), bytes_in=sum(
            sum(len(t) for t in res.parameters.tensors) for _, res in results))
        for failure in failures:
            log.warning("round %d: a site failed under SecAgg+: %s", server_round, failure)
        if not results:
            return None, {}
        # weights travel in the clear: one beyond max-weight wrapped modulo 2^32 inside the
        # masked sum, so the whole aggregate is refused (the global model is kept)
        overweight = {str(res.metrics.get("site", "")) or f"site-{i}": str(UpdateError(errs))
                      for i, (_, res) in enumerate(results)
                      if (errs := check_weight(res.num_examples,
                                               max_weight=self.cfg.secagg_max_weight))}
        if overweight:
            log.error("round %d: aggregate refused, the global model is kept: %s",
                      server_round, overweight)
            self.recorder.reject(overweight)
            return None, dict(agg)
        values = parameters_to_ndarrays(results[0][1].parameters)  # the unmasked mean
        try:
            named = screen_aggregate(self.model, values, max_norm=self.cfg.max_update_norm)
        except UpdateError as err:
            log.error("round %d: aggregate refused, the global model is kept: %s",
                      server_round, err)
            self.recorder.reject({"aggregate": str(err)})
            return None, dict(agg)
        return ndarrays_to_parameters(wire.to_numpy_list(named)), dict(agg)


class KeyExchangeDropoutWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, except for a site that fails during the key exchange.

    Flower 1.41 fixes the round's sampled sites when it sends the setup stage. A site whose
    setup or share-keys reply is missing or an error (a link cut as the round starts, a
    site just rejoining) never handed shares of its keys to the others, and nobody masked
    with it; yet at unmasking the workflow counts it as dropped and asks for its shares,
    finds none and halts the round ("Not enough shares to recover secret"): the other
    sites' work is lost. Here the sites of the round are those that finished the key
    exchange; one that drops after it is unmasked from its shares as before."""

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState
                         ) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        left = state.sampled_node_ids - state.active_node_ids
        if left:
            log.warning("SecAgg+: %d site(s) did not finish the key exchange; the round goes "
                        "on with the %d that did", len(left), len(state.active_node_ids))
        state.sampled_node_ids = set(state.active_node_ids)
        return bool(ok)


def secagg_workflow(cfg: RunConfig) -> SecAggPlusWorkflow:
    return KeyExchangeDropoutWorkflow(
        num_shares=1.0,  # every sampled site holds a share of every other's keys
        reconstruction_threshold=cfg.secagg_threshold, max_weight=cfg.secagg_max_weight,
        clipping_range=cfg.secagg_clip, quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE, timeout=cfg.round_timeout_s)


def run_secure(grid: Grid, context: Context, cfg: RunConfig, model: nn.Module,
               recorder: RoundRecorder, end_of_round: EndOfRound, *,
               initial: ArrayRecord, round_offset: int = 0) -> ArrayRecord:
    """SecAgg+ rounds ``round_offset + 1`` .. ``cfg.rounds`` over ``grid`` (every
    exchange of the workflow goes through it), from ``initial``; returns the final global
    model (packed). A fresh run (``round_offset`` 0) records its initial model as round 0
    first; a resumed one has it recorded."""
    if round_offset >= cfg.rounds:  # resumed after the last round: nothing left to train
        return initial
    strategy = SecureFedAvg(cfg, model, recorder, initial=initial, round_offset=round_offset)
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=cfg.rounds - round_offset),
                           strategy=strategy,
                           client_manager=DeadlineClientManager(cfg.round_timeout_s))

    def current() -> ArrayRecord:
        return wire.from_numpy_list(model, wire.to_numpy_list(
            legacy.state.array_records[MAIN_PARAMS_RECORD]))

    def evaluate_workflow(grid: Grid, ctx: Context) -> None:
        """No evaluate exchange: the sites' evaluation came with the train replies."""
        server_round = cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        end_of_round(server_round + round_offset, current())

    if round_offset == 0:
        end_of_round(0, initial)
    DefaultWorkflow(fit_workflow=secagg_workflow(cfg), evaluate_workflow=evaluate_workflow)(
        grid, legacy)
    return current()

