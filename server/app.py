"""The Flower ServerApp (``fedpacs.server.app:app``): FedAvg over the sites, with a
checkpoint and metrics written after every round and the final model saved for researchers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import XVAL_GLOBAL, RoundInstructions
from fedpacs.common.datasets import load_holdout
from fedpacs.common.engine import evaluate
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.signing import sign_run
from fedpacs.common.telemetry import multiprocess_dir
from fedpacs.common.wire import XVAL_MODEL_KEY
from fedpacs.server.metrics import ServerMetrics
from fedpacs.server.recorder import RoundRecord, RoundRecorder, metric_dict, site_name
from fedpacs.server.report import write_report
from fedpacs.server.rundir import RUNS_DIR_ENV, RunDirectory, read_server_side
from fedpacs.server.secure import run_secure
from fedpacs.server.strategies import make_strategy

log = logging.getLogger("fedpacs.server")

app = ServerApp()


class FederatedRun:
    """One run of the ServerApp: the global model, its run directory, held-out data, the
    round recorder and the Prometheus series; :meth:`run` drives the rounds."""

    def __init__(self, grid: Grid, cfg: RunConfig, context: Context) -> None:
        if not cfg.run_dir:
            raise ConfigError("run config", [FieldError(
                "run-dir", "the server-side folder for this run's checkpoints", "nothing",
                "start runs with `fedpacs run start` (it writes the run's server.json and "
                f"starts the SuperLink with ${RUNS_DIR_ENV})")])
        self.grid, self.cfg, self.context = grid, cfg, context
        self.task = cfg.task_config()
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.task, seed=cfg.seed)
        self.run_dir = RunDirectory(Path(cfg.run_dir), task=self.task, config=cfg.to_flat())
        spec = cfg.eval_spec()
        self.holdout = load_holdout(spec, self.task) if spec else None
        self.device = pick_device("auto")
        self.recorder = RoundRecorder()
        self.metrics = ServerMetrics()
        if cfg.metrics_port and multiprocess_dir() is None:  # no exporter: serve from here
            self.metrics.serve(cfg.metrics_port)
        self.metrics.rounds_total.set(cfg.rounds)
        self.metrics.round.set(0)
        self.round_started = time.monotonic()
        self.current = wire.model_to_arrays(self.model)  # the global model after each round

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Load the round's global model, evaluate it on the held-out split, record and
        checkpoint the round (round 0: the initial model)."""
        wire.load_arrays(self.model, arrays)
        self.current = arrays
        record = self.recorder.close(server_round)
        if self.holdout is not None:
            record.heldout = evaluate(self.model, self.holdout, task=self.task,
                                      device=self.device)
            record.heldout["num-examples"] = float(len(self.holdout))
        record.time = time.time()
        if server_round > 0:  # metrics first: a reader of metrics.json then sees them too
            update_metrics(self.metrics, record, arrays,
                           connected=len(list(self.grid.get_node_ids())),
                           seconds=time.monotonic() - self.round_started)
        self.round_started = time.monotonic()
        self.run_dir.save_round(self.model, record)
        self.run_dir.set_status("running", round_=server_round, total=self.cfg.rounds)
        log.info("round %d/%d done: %s", server_round, self.cfg.rounds, record.heldout)
        return MetricRecord({f"heldout-{k}": float(v) for k, v in record.heldout.items()})

    def run(self) -> Path:
        """``cfg.rounds`` rounds (under SecAgg+ unless ``cfg.secagg`` is off), cross-site
        validation, the final model, report and signature; returns the final model's path."""
        cfg = self.cfg
        self.run_dir.set_status("running", round_=0, total=cfg.rounds)
        try:
            if cfg.secagg:
                final_arrays = run_secure(self.grid, self.context, cfg, self.model,
                                          self.recorder, self.end_of_round)
            else:
                strategy = make_strategy(cfg, self.recorder, self.model)
                instructions = RoundInstructions.for_round(cfg, 0).to_record()
                strategy.start(
                    grid=self.grid, initial_arrays=wire.model_to_arrays(self.model),
                    num_rounds=cfg.rounds, timeout=cfg.round_timeout_s,
                    train_config=instructions, evaluate_config=instructions,
                    evaluate_fn=self.end_of_round)
                # (the result's arrays stay empty when no round aggregated anything)
                final_arrays = self.current
        except BaseException as exc:
            self.run_dir.set_status("failed", round_=len(self.run_dir.rounds) - 1,
                                    total=cfg.rounds, error=type(exc).__name__)
            raise
        wire.load_arrays(self.model, final_arrays)
        # The global model goes to every site. A site's local model (plain mode only; under
        # SecAgg+ none is ever seen) goes to the others only when the run asks for it and
        # the site consented in its config; each receiving site checks its own consent too.
        local = self.recorder.shared_local_models() if cfg.cross_site_local else {}
        cross = (cross_site_validation(self.grid, {XVAL_GLOBAL: final_arrays, **local},
                                       cfg, timeout_s=cfg.round_timeout_s)
                 if cfg.cross_site else {})
        final = self.run_dir.save_final(self.model, {
            "cross_site": cross,
            "sites": dict(sorted(self.recorder.site_samples.items())),
            "num_rounds": cfg.rounds,
            "strategy": cfg.strategy,
            "fedbn": cfg.fedbn,
            "secure_aggregation": "SecAgg+" if cfg.secagg else "off",
            "local_dp": {"clip": cfg.dp_clip, "epsilon": cfg.dp_epsilon, "delta": cfg.dp_delta}
            if cfg.dp_clip > 0 else "off",
        })
        write_report(self.run_dir.root)
        if cfg.artifact_key:
            sign_run(self.run_dir.root, Path(cfg.artifact_key))
        self.run_dir.set_status("finished", round_=cfg.rounds, total=cfg.rounds)
        return final


def run_federation(grid: Grid, cfg: RunConfig, context: Context) -> Path:
    """Run ``cfg`` on ``grid``; returns the final model's path."""
    return FederatedRun(grid, cfg, context).run()


def cross_site_validation(grid: Grid, models: dict[str, ArrayRecord], cfg: RunConfig, *,
                          timeout_s: float) -> dict[str, dict[str, dict[str, float]]]:
    """Every model (the global one and each site's last local one) evaluated on every
    site's validation split: ``matrix[model][site] = metrics``."""
    nodes = sorted(grid.get_node_ids())
    messages = []
    for name, arrays in models.items():
        config = RoundInstructions.for_round(cfg, cfg.rounds + 1, xval_model=name,
                                             fedbn=False).to_record()
        for node in nodes:
            content = RecordDict({wire.ARRAYS_KEY: arrays, wire.CONFIG_KEY: config})
            messages.append(Message(content=content, dst_node_id=node,
                                    message_type=MessageType.EVALUATE))
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    matrix: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for reply in replies:
        if reply.has_error():
            log.warning("cross-site validation: node %s replied %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        site_rec = reply.content.config_records.get(wire.SITE_KEY)
        name = str(site_rec.get(XVAL_MODEL_KEY, "")) if site_rec is not None else ""
        if name not in matrix:
            continue
        site = site_name(reply.content, int(reply.metadata.src_node_id))
        metrics = metric_dict(reply.content)
        matrix[name][site] = {k[4:] if k.startswith("val-") else k: v for k, v in metrics.items()}
    return matrix


def update_metrics(m: ServerMetrics, record: RoundRecord, arrays: ArrayRecord, *,
                   connected: int, seconds: float) -> None:
    """Publish one finished round's record as Prometheus series."""
    participating = record.participating
    m.round.set(record.round)
    m.round_seconds.set(seconds)
    m.participating.set(participating)
    m.dropped.set(max(connected - participating, 0))
    m.bytes_in.inc(record.train.bytes_in if record.train else 0)
    evaluated = len(record.evaluate.sites) if record.evaluate else 0
    m.bytes_out.inc(arrays.count_bytes() * (participating + evaluated))
    if record.train and "train-loss" in record.train.aggregate:
        m.train_loss.set(record.train.aggregate["train-loss"])
    for k, v in record.heldout.items():
        m.heldout.labels(metric=k).set(v)
    for k, v in (record.evaluate.aggregate if record.evaluate else {}).items():
        if k.startswith("val-"):
            m.federated.labels(metric=k[4:]).set(v)


@app.main()
def main(grid: Grid, context: Context) -> None:
    app_config = dict(context.run_config)
    server_side = read_server_side(str(app_config.get("run-name", "")))
    flat = app_config | {k.replace("_", "-"): v for k, v in server_side.items()}
    run_federation(grid, RunConfig.from_flat(flat), context)
