"""The Flower ServerApp (``fedpacs.server.app:app``): FedAvg over the sites, with a
checkpoint and metrics written after every round and the final model saved for researchers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.datasets import load_holdout
from fedpacs.common.engine import evaluate
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.signing import sign_run
from fedpacs.common.telemetry import multiprocess_dir
from fedpacs.common.wire import XVAL_MODEL_KEY
from fedpacs.server.metrics import ServerMetrics
from fedpacs.server.recorder import RoundRecorder, metric_dict, site_name
from fedpacs.server.report import write_report
from fedpacs.server.rundir import RunDirectory
from fedpacs.server.secure import run_secure
from fedpacs.server.strategies import make_strategy

log = logging.getLogger("fedpacs.server")

app = ServerApp()


def run_federation(grid: Grid, cfg: RunConfig, context: Context | None = None) -> Path:
    """Run ``cfg.rounds`` rounds on ``grid`` (under SecAgg+ unless ``cfg.secagg`` is off);
    returns the final model's path."""
    task = cfg.task_config()
    torch.manual_seed(cfg.seed)
    model = build_model(task, seed=cfg.seed)
    run_dir = RunDirectory(Path(cfg.run_dir), task=task, config=cfg.to_flat())
    spec = cfg.eval_spec()
    holdout = load_holdout(spec, task) if spec else None
    device = pick_device("auto")
    recorder = RoundRecorder()
    metrics = ServerMetrics()
    if cfg.metrics_port and multiprocess_dir() is None:  # no exporter: serve from here
        metrics.serve(cfg.metrics_port)
    metrics.rounds_total.set(cfg.rounds)
    metrics.round.set(0)
    clock = {"last": time.monotonic()}

    current = {"arrays": wire.model_to_arrays(model)}  # the global model after each round

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        wire.load_arrays(model, arrays)
        current["arrays"] = arrays
        record: dict[str, Any] = recorder.flush()
        server_metrics: dict[str, float] = {}
        if holdout is not None:
            server_metrics = evaluate(model, holdout, task=task, device=device)
            server_metrics["num-examples"] = float(len(holdout))
            record["heldout"] = server_metrics
        record["time"] = time.time()
        if server_round > 0:  # metrics first: a reader of metrics.json then sees them too
            update_metrics(metrics, record, arrays, connected=len(list(grid.get_node_ids())),
                           seconds=time.monotonic() - clock["last"], server_round=server_round)
        clock["last"] = time.monotonic()
        run_dir.save_round(server_round, model, record)
        run_dir.set_status("running", round_=server_round, total=cfg.rounds)
        log.info("round %d/%d done: %s", server_round, cfg.rounds, server_metrics)
        return MetricRecord({f"heldout-{k}": float(v) for k, v in server_metrics.items()})

    run_dir.set_status("running", round_=0, total=cfg.rounds)
    try:
        if cfg.secagg:
            final_arrays = run_secure(grid, context or Context(0, 0, {}, RecordDict(), {}),
                                      cfg, model, recorder, end_of_round)
        else:
            strategy = make_strategy(cfg, recorder, model)
            strategy.start(
                grid=grid, initial_arrays=wire.model_to_arrays(model), num_rounds=cfg.rounds,
                timeout=cfg.round_timeout_s, train_config=ConfigRecord(cfg.site_view()),
                evaluate_config=ConfigRecord(cfg.site_view()), evaluate_fn=end_of_round,
            )
            # (the result's arrays stay empty when no round aggregated anything)
            final_arrays = current["arrays"]
    except BaseException as exc:
        run_dir.set_status("failed", round_=len(run_dir.rounds) - 1, total=cfg.rounds,
                           error=type(exc).__name__)
        raise
    wire.load_arrays(model, final_arrays)
    # under SecAgg+ no site's local model is ever seen: only the global one is cross-validated
    cross = (cross_site_validation(grid, {"global": final_arrays, **recorder.local_models},
                                   cfg, timeout_s=cfg.round_timeout_s)
             if cfg.cross_site else {})
    final = run_dir.save_final(model, {
        "cross_site": cross,
        "sites": dict(sorted(recorder.site_samples.items())),
        "num_rounds": cfg.rounds,
        "strategy": cfg.strategy,
        "fedbn": cfg.fedbn,
        "secure_aggregation": "SecAgg+" if cfg.secagg else "off",
        "local_dp": {"clip": cfg.dp_clip, "epsilon": cfg.dp_epsilon, "delta": cfg.dp_delta}
        if cfg.dp_clip > 0 else "off",
    })
    write_report(run_dir.root)
    if cfg.signing_key:
        sign_run(run_dir.root, Path(cfg.signing_key))
    run_dir.set_status("finished", round_=cfg.rounds, total=cfg.rounds)
    return final


def cross_site_validation(grid: Grid, models: dict[str, ArrayRecord], cfg: RunConfig, *,
                          timeout_s: float) -> dict[str, dict[str, dict[str, float]]]:
    """Every model (the global one and each site's last local one) evaluated on every
    site's validation split: ``matrix[model][site] = metrics``."""
    nodes = sorted(grid.get_node_ids())
    messages = []
    for name, arrays in models.items():
        config = ConfigRecord({**cfg.site_view(), "fedbn": False,
                               "server-round": cfg.rounds + 1, XVAL_MODEL_KEY: name})
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


def update_metrics(m: ServerMetrics, record: dict[str, Any], arrays: ArrayRecord, *,
                   connected: int, seconds: float, server_round: int) -> None:
    """Publish one finished round's record as Prometheus series."""
    participating = len(record.get("train_sites", {}))
    m.round.set(server_round)
    m.round_seconds.set(seconds)
    m.participating.set(participating)
    m.dropped.set(max(connected - participating, 0))
    m.bytes_in.inc(record.get("train_bytes_in", 0))
    m.bytes_out.inc(arrays.count_bytes() * (participating
                                            + len(record.get("evaluate_sites", {}))))
    if "train-loss" in record.get("train", {}):
        m.train_loss.set(record["train"]["train-loss"])
    for k, v in (record.get("heldout") or {}).items():
        m.heldout.labels(metric=k).set(v)
    for k, v in (record.get("evaluate") or {}).items():
        if k.startswith("val-"):
            m.federated.labels(metric=k[4:]).set(v)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(dict(context.run_config))
    if not cfg.run_dir:
        cfg = RunConfig.from_flat({**cfg.to_flat(), "run-dir": str(Path.cwd() / "fedpacs-run")})
    run_federation(grid, cfg, context)
