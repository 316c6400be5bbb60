"""The Flower ServerApp (``fedpacs.server.app:app``): FedAvg over the sites, with a
checkpoint and metrics written after every round and the final model saved for researchers.

Every exchange with the sites goes through one :class:`~fedpacs.server.grid.FastGrid`
(short polling, a log of exchanges). A round is one exchange (four under SecAgg+): each
site evaluates the global model it receives before training and sends that with its
update, which is the evaluation of the *previous* round's model; it is added to that
round's record. After the last round one evaluate exchange evaluates the final model.

A run stopped part-way (``status.json``: interrupted or failed) continues from its last
completed round when its ``server.json`` says so (``resume-from``, written by
fedpacs.server.resume.mark_resume): the global model, the strategy's state, the round
numbers and the records so far come back from that round's checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
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
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import RunNotRunningException

from fedpacs.common import wire
from fedpacs.common.artifacts import write_json
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import (
    TIMING_PREFIX,
    VAL_PREFIX,
    XVAL_GLOBAL,
    RoundInstructions,
    personal_metrics,
)
from fedpacs.common.datasets import load_holdout
from fedpacs.common.engine import evaluate, evaluate_cases
from fedpacs.common.errors import (
    ConfigError,
    DataError,
    FedpacsError,
    FieldError,
    NoUpdateError,
    describe,
)
from fedpacs.common.flowertune import quick_object_pulls
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.preprocess import preprocessed
from fedpacs.common.recipe import round_lr
from fedpacs.common.signing import HELDOUT_CASES_FILE, sign_run
from fedpacs.common.telemetry import multiprocess_dir
from fedpacs.common.transfer import load_init_model, weights_sha256
from fedpacs.common.wire import XVAL_MODEL_KEY
from fedpacs.server.grid import FastGrid
from fedpacs.server.metrics import ServerMetrics
from fedpacs.server.recorder import (
    TRAIN_SECONDS_FALLBACK,
    Phase,
    RoundRecord,
    RoundRecorder,
    Timing,
    evaluation_phase,
    metric_dict,
    site_errors,
    site_name,
    unanswered,
    unchanged_rounds,
)
from fedpacs.server.report import write_report
from fedpacs.server.resume import RESUME_KEY, Checkpoint, open_checkpoint
from fedpacs.server.rundir import (
    METRICS_FILE,
    RUNS_DIR_ENV,
    STRATEGY_FILE,
    RunDirectory,
    read_rounds,
    read_server_side,
    round_folder,
)
from fedpacs.server.secure import run_secure
from fedpacs.server.strategies import make_strategy, restore_state, strategy_state

log = logging.getLogger("fedpacs.server")

app = ServerApp()


class Terminated(SystemExit):
    """The ServerApp process was sent SIGTERM (raised in its main thread)."""


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def install_sigterm_handler() -> bool:
    """SIGTERM raises :class:`Terminated` in the main thread, so that the run records
    itself as interrupted; only where no handler is installed (Flower's own ServerApp
    process has one, which exits with SystemExit after closing its grid)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return False
    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def stopped_by_superlink(exc: BaseException) -> bool:
    """Whether ``exc`` is the SuperLink saying the run no longer runs, as Flower 1.41's
    HTTP grid hands it to the ServerApp once an operator stopped the run (``flwr stop``,
    `fedpacs run stop`): :class:`RunNotRunningException` for an HTTP 403, or the HTTP 401
    of the task token the stop revoked. (Flower's retry invoker turns the first 401 into a
    SIGINT, hence SystemExit; a call that meets the 401 after that, in the main thread
    before the signal's handler ran, raises it as it is.)"""
    if isinstance(exc, RunNotRunningException):
        return True
    return isinstance(exc, httpx.HTTPStatusError) \
        and exc.response.status_code == httpx.codes.UNAUTHORIZED


def is_stop(exc: BaseException) -> bool:
    """Whether ``exc`` ends a run as interrupted (a signal, an exit, the SuperLink's stop)
    rather than failed."""
    return isinstance(exc, KeyboardInterrupt | SystemExit) or stopped_by_superlink(exc)


def stop_reason(exc: BaseException) -> str:
    """Why a run stopped, for status.json: the signal, exit or SuperLink's stop
    (interrupted), else the exception's type (failed)."""
    if stopped_by_superlink(exc):
        return f"the SuperLink stopped the run ({type(exc).__name__})"
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt (SIGINT)"
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code})"
    return type(exc).__name__


DETAIL_CHARS = 2000  # status.json's ``detail``: the head of a coded error's message


def no_update_message(rounds: list[dict[str, Any]]) -> str:
    """Why no round of the run changed the global model, round by round, from what the
    round records say of the sites (no site data: counts, the sites' error codes, and the
    server's own screening)."""
    lines, codes = [], set()
    for r in rounds[1:]:
        sec = r.get("secagg") or {}
        said = [f"{len(r.get('train_sites') or {})} site(s) trained"]
        if sec:
            said.append(f"SecAgg+ summed {sec.get('sites_summed', 0)}, dropped "
                        f"{sec.get('sites_dropped', 0)}")
        if r.get("dropped"):
            said.append(f"{r['dropped']} did not answer in time")
        for label, n in sorted((r.get("site_errors") or {}).items()):
            said.append(f"{n} answered {label}")
            if label.startswith("FP"):
                codes.add(int(label[2:5]))
        said += [f"{who} screened out: {' '.join(why.split())[:200]}"
                 for who, why in sorted((r.get("rejected") or {}).items())]
        lines.append(f"  - round {r['round']}: " + "; ".join(said))
    lines += [f"  FP{code:03d}: {describe(code)}" for code in sorted(codes)]
    return (f"no round of the {len(rounds) - 1} changed the global model: nothing was "
            f"published (no final model, no signature).\n" + "\n".join(lines) +
            "\nFix: each site's log (its daemon's) names why it refused or failed; a site that "
            "did not answer was offline or slower than the round timeout (--round-timeout)")


class FederatedRun:
    """One run of the ServerApp: the global model, its run directory, held-out data, the
    round recorder and the Prometheus series; :meth:`run` drives the rounds. ``grid`` is
    wrapped once in a FastGrid, through which every exchange of the run goes.

    With ``cfg.resume_from`` >= 0 the run continues after that completed round from its
    checkpoint (verified by fedpacs.server.resume.open_checkpoint): the global model,
    the strategy's state, the records so far (a later, unrecorded round is dropped), the
    recorder's per-site sample counts; rounds ``resume_from + 1`` .. ``rounds`` follow
    with their true numbers. A fresh run writes its config as started (run-config.json)."""

    def __init__(self, grid: Grid, cfg: RunConfig, context: Context) -> None:
        if not cfg.run_dir:
            raise ConfigError("run config", [FieldError(
                "run-dir", "the server-side folder for this run's checkpoints", "nothing",
                "start runs with `fedpacs run start` (it writes the run's server.json and "
                f"starts the SuperLink with ${RUNS_DIR_ENV})")])
        self.grid = FastGrid(grid, default_timeout_s=cfg.round_timeout_s)
        self.cfg, self.context = cfg, context
        self.task = cfg.task_config()
        self.recipe = cfg.recipe()
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.task, seed=cfg.seed)
        self.init_source = ""  # round 0's weights when they come from --init-model
        if cfg.init_model and cfg.resume_from < 0:
            init = load_init_model(cfg.init_model, self.task, registry_root=Path(
                cfg.init_registry) if cfg.init_registry else None)
            self.model.load_state_dict(init.state_dict)
            self.init_source = f"{init.kind}: {Path(init.source).name}"
        # (the run's identity in every card: its config as started, not where it resumed)
        self.run_dir = RunDirectory(Path(cfg.run_dir), task=self.task,
                                    config=replace(cfg, resume_from=-1).to_flat())
        self.resumed: Checkpoint | None = None
        self.offset = 0  # the run's last completed round before this ServerApp started
        self.prior_exchanges: list[dict[str, Any]] = []  # of the rounds before the resume
        self.strategy: Strategy | None = None  # plain mode's strategy, once built
        spec = cfg.eval_spec()
        self.holdout = preprocessed(load_holdout(spec, self.task), self.task) if spec else None
        self.device = pick_device("auto")
        self.recorder = RoundRecorder()
        self.metrics = ServerMetrics()
        if cfg.metrics_port and multiprocess_dir() is None:  # no exporter: serve from here
            self.metrics.serve(cfg.metrics_port)
        self.metrics.rounds_total.set(cfg.rounds)
        self.metrics.round.set(0)
        self.round_started = time.monotonic()
        self.exchanges_seen = 0  # FastGrid's log entries already in a round's timing
        self.current = wire.model_to_arrays(self.model)  # the global model after each round
        if cfg.resume_from >= 0:
            try:
                checkpoint = open_checkpoint(cfg)
            except (ConfigError, DataError) as exc:  # the run says why it did not go on
                self.run_dir.set_status("failed", round_=len(read_rounds(self.run_dir.root))
                                        - 1, total=cfg.rounds, error=stop_reason(exc))
                raise
            self._resume(checkpoint)
        else:
            self.run_dir.write_run_config(cfg.to_flat())

    def _resume(self, checkpoint: Checkpoint) -> None:
        self.resumed, self.offset = checkpoint, checkpoint.round
        self.model.load_state_dict(checkpoint.state_dict)
        self.current = checkpoint.global_arrays
        self.run_dir.reopen(checkpoint.records)
        self.recorder = RoundRecorder.resumed(
            [RoundRecord.from_json(r) for r in checkpoint.records])
        self.prior_exchanges = [e for r in checkpoint.records
                                for e in (r.get("timing") or {}).get("exchanges") or []]
        self.metrics.round.set(checkpoint.round)
        if self.cfg.cross_site_local:
            log.warning("resumed after round %d: the sites' local models of the rounds "
                        "before are not kept; cross-site validation has those of the "
                        "rounds from here", checkpoint.round)

    def on_round(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: its round 0 is the starting model (recorded already when
        the run resumes), its round r the run's round ``offset + r``."""
        if flower_round == 0 and self.offset > 0:
            return None
        return self.end_of_round(flower_round + self.offset, arrays)

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Load the round's global model, evaluate it on the held-out split, checkpoint
        and record the round (round 0: the initial model) with its timing, and add the
        sites' evaluation of the previous round's model (from this round's replies) to
        that round's record."""
        closing = time.monotonic()
        exchanges = self.grid.exchanges[self.exchanges_seen:]
        self.exchanges_seen = len(self.grid.exchanges)
        wire.load_arrays(self.model, arrays)
        self.current = arrays
        closed = self.recorder.close(server_round)
        record = closed.record
        record.dropped = unanswered(exchanges)  # (SecAgg+ stages count theirs in secagg)
        record.site_errors = site_errors(exchanges)
        started = time.monotonic()
        record.weights_sha256 = weights_sha256(self.model.state_dict())
        if server_round == 0:
            record.init_model = self.init_source
        else:
            record.lr = round_lr(self.cfg.lr, server_round, self.cfg.rounds, self.recipe)
        if self.holdout is not None:
            with torch.random.fork_rng(devices=[]):
                record.heldout = evaluate(self.model, self.holdout, task=self.task,
                                          device=self.device, recipe=self.recipe,
                                          seed=self.cfg.seed + server_round)
            record.heldout["num-examples"] = float(len(self.holdout))
        heldout_s = time.monotonic() - started
        record.time = time.time()
        started = time.monotonic()
        self.run_dir.save_checkpoint(self.model, record, global_arrays=arrays,
                                     strategy=strategy_state(self.strategy))
        checkpoint_s = time.monotonic() - started
        trained = record.train.sites if record.train else {}
        sites = {name: {k: v for k, v in trained.get(name, {}).items()
                        if k == TRAIN_SECONDS_FALLBACK} | closed.site_phases.get(name, {})
                 for name in sorted(set(trained) | set(closed.site_phases))}
        record.timing = Timing.build(
            round_s=time.monotonic() - self.round_started, exchanges=exchanges, sites=sites,
            aggregate_s=closing - exchanges[-1].ended if exchanges else 0.0,
            heldout_s=heldout_s, checkpoint_s=checkpoint_s)
        if server_round > 0:  # metrics first: a reader of metrics.json then sees them too
            update_metrics(self.metrics, record, arrays,
                           connected=len(list(self.grid.get_node_ids())),
                           evaluated=closed.evaluated_before)
        if closed.evaluated_before is not None and server_round > 0:
            self.run_dir.amend_round(server_round - 1, evaluate=closed.evaluated_before)
        self.run_dir.append_round(record)
        self.run_dir.set_status("running", round_=server_round, total=self.cfg.rounds)
        self.round_started = time.monotonic()
        log.info("round %d/%d done in %.1fs (overhead %.0f%%): %s", server_round,
                 self.cfg.rounds, record.timing.round_s, 100 * record.timing.overhead_fraction,
                 record.heldout)
        return MetricRecord({f"heldout-{k}": float(v) for k, v in record.heldout.items()})

    def run(self) -> Path:
        """``cfg.rounds`` rounds (under SecAgg+ unless ``cfg.secagg`` is off), the final
        model's evaluation by the sites, cross-site validation, the final model, report
        and signature; returns the final model's path."""
        cfg = self.cfg
        self.run_dir.set_status("running", round_=self.offset, total=cfg.rounds)
        try:
            return self._run()
        except BaseException as exc:
            self.run_dir.set_status("interrupted" if is_stop(exc) else "failed",
                                    round_=len(self.run_dir.rounds) - 1, total=cfg.rounds,
                                    error=stop_reason(exc), detail=str(exc)[:DETAIL_CHARS]
                                    if isinstance(exc, FedpacsError) else "")
            raise

    def _run(self) -> Path:
        cfg = self.cfg
        if cfg.secagg:
            final_arrays = run_secure(self.grid, self.context, cfg, self.model,
                                      self.recorder, self.end_of_round,
                                      initial=self.current, round_offset=self.offset)
        else:
            self.strategy = make_strategy(cfg, self.recorder, self.model,
                                          round_offset=self.offset)
            if self.resumed is not None:
                restore_state(self.strategy, self.resumed.strategy_state,
                              source=str(round_folder(self.run_dir.root, self.offset)
                                         / STRATEGY_FILE))
            # (the strategy sends each round its own instructions: this one is Flower's
            # start-up argument, replaced round by round)
            instructions = RoundInstructions.for_round(cfg, self.offset + 1,
                                                       evaluate_first=True)
            if cfg.rounds > self.offset:
                self.strategy.start(
                    grid=self.grid, initial_arrays=self.current,
                    num_rounds=cfg.rounds - self.offset, timeout=cfg.round_timeout_s,
                    train_config=instructions.to_record(), evaluate_fn=self.on_round)
            # (the result's arrays stay empty when no round aggregated anything)
            final_arrays = self.current
        unchanged = unchanged_rounds(self.run_dir.rounds)
        if cfg.rounds > 0 and unchanged == list(range(1, cfg.rounds + 1)):
            raise NoUpdateError(no_update_message(self.run_dir.rounds))
        if unchanged:
            log.warning("round(s) %s left the global model as it was: no site's update "
                        "reached the aggregate (metrics.json says why)", unchanged)
        # the last round's model has no next round to bring its evaluation: ask once
        final_eval = federated_evaluation(self.grid, final_arrays, cfg, cfg.rounds)
        if final_eval is not None:
            self.run_dir.amend_round(cfg.rounds, evaluate=final_eval)
            publish_evaluation(self.metrics, final_eval)
            self.metrics.bytes_out.inc(final_arrays.count_bytes() * len(final_eval.sites))
        wire.load_arrays(self.model, final_arrays)
        cross = self.cross_site(final_arrays, final_eval) if cfg.cross_site else {}
        personal = personalization(self.grid, final_arrays, cfg)
        if personal:  # metrics.json's and the model card's "personalization"
            write_personalization(self.run_dir.root, personal)
        final = self.run_dir.save_final(self.model, {
            "personalization": personal,
            "cross_site": cross,
            "sites": dict(sorted(self.recorder.site_samples.items())),
            "num_rounds": cfg.rounds,
            "strategy": cfg.strategy,
            "fedbn": cfg.fedbn,
            "secure_aggregation": "SecAgg+" if cfg.secagg else "off",
            "local_dp": {"clip": cfg.dp_clip, "epsilon": cfg.dp_epsilon, "delta": cfg.dp_delta}
            if cfg.dp_clip > 0 else "off",
            "exchanges": self.prior_exchanges + [e.to_json() for e in self.grid.exchanges],
            "resumed_from": cfg.resume_from,  # -1: never stopped (else the last resume)
            "rounds_unchanged": unchanged,  # rounds no site's update reached the aggregate
        })
        self.heldout_cases()
        write_report(self.run_dir.root)
        if cfg.artifact_key:
            sign_run(self.run_dir.root, Path(cfg.artifact_key))
        self.run_dir.set_status("finished", round_=cfg.rounds, total=cfg.rounds)
        return final

    def heldout_cases(self) -> None:
        """With an uncertainty method, the final model's per-case held-out results in
        ``final/heldout_cases.json`` (signed with the run): case index in the held-out
        split, metric, uncertainty; the cases to look at first (most uncertain) on top."""
        if self.holdout is None or self.recipe.uncertainty == "none":
            return
        with torch.random.fork_rng(devices=[]):
            cases = evaluate_cases(self.model, self.holdout, task=self.task,
                                   device=self.device, recipe=self.recipe, seed=self.cfg.seed)
        rows = sorted((asdict(c) for c in cases), key=lambda c: -c["uncertainty"])
        write_json(self.run_dir.root / HELDOUT_CASES_FILE, {
            "method": self.recipe.uncertainty, "samples": self.recipe.uncertainty_samples,
            "uncertainty": "predictive entropy of the mean prediction, nats (per voxel, "
                           "averaged over the case, for segmentation)", "cases": rows})

    def cross_site(self, final_arrays: ArrayRecord, final_eval: Phase | None
                   ) -> dict[str, dict[str, dict[str, float]]]:
        """The global model goes to every site. A site's local model (plain mode only;
        under SecAgg+ none is ever seen) goes to the others only when the run asks for it
        and the site consented in its config; each receiving site checks its own consent
        too. Without FedBN the global model's row is the final evaluation just done (the
        same model on the same splits), so it is not sent again."""
        local = self.recorder.shared_local_models() if self.cfg.cross_site_local else {}
        reuse = final_eval is not None and not self.cfg.fedbn
        models = ({} if reuse else {XVAL_GLOBAL: final_arrays}) | local
        known = ({XVAL_GLOBAL: {s: xval_row(m) for s, m in final_eval.sites.items()}}
                 if final_eval is not None and reuse else {})
        return known | (cross_site_validation(self.grid, models, self.cfg,
                                              timeout_s=self.cfg.round_timeout_s)
                        if models else {})


def run_federation(grid: Grid, cfg: RunConfig, context: Context) -> Path:
    """Run ``cfg`` on ``grid``; returns the final model's path."""
    return FederatedRun(grid, cfg, context).run()


def federated_evaluation(grid: Grid, arrays: ArrayRecord, cfg: RunConfig, server_round: int
                         ) -> Phase | None:
    """Every site evaluates ``arrays`` on its validation split (one exchange); the sites'
    metrics and their mean weighted by each site's sample count (None: no site replied)."""
    config = RoundInstructions.for_round(cfg, server_round).to_record()
    messages = [Message(content=RecordDict({wire.ARRAYS_KEY: arrays, wire.CONFIG_KEY: config}),
                        dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in sorted(grid.get_node_ids())]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
    for r in replies:
        if r.has_error():
            log.warning("evaluation: node %s replied %s", r.metadata.src_node_id, r.error.reason)
    records = [r.content for r in replies if not r.has_error()]
    return evaluation_phase(records, wire.NUM_EXAMPLES)[1] if records else None


def personalization(grid: Grid, arrays: ArrayRecord, cfg: RunConfig) -> dict[str, Any]:
    """``cfg.personalize == "finetune"``: every site fine-tunes the final global model
    ``arrays`` on its own training split for ``personalize-epochs`` (one evaluate
    exchange; the personal models stay at the sites) and reports its validation metrics
    before and after. Returns each phase's per-site metrics and their mean weighted by
    the sites' validation counts, and the mean's gain per metric ({}: not asked, or no
    site replied)."""
    if cfg.personalize == "none":
        return {}
    config = RoundInstructions.for_round(cfg, cfg.rounds, personalize_epochs=cfg.
                                         personalize_epochs).to_record()
    messages = [Message(content=RecordDict({wire.ARRAYS_KEY: arrays, wire.CONFIG_KEY: config}),
                        dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in sorted(grid.get_node_ids())]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
    before: list[RecordDict] = []
    after: list[RecordDict] = []
    for r in replies:
        if r.has_error():
            log.warning("personalisation: node %s replied %s", r.metadata.src_node_id,
                        r.error.reason)
            continue
        b, a = personal_metrics(metric_dict(r.content))
        for out, values in ((before, b), (after, a)):
            out.append(RecordDict({wire.METRICS_KEY: MetricRecord(values),
                                   wire.SITE_KEY: r.content.config_records[wire.SITE_KEY]}))
    if not before:
        return {}
    phases = {name: evaluation_phase(recs, wire.NUM_EXAMPLES)[1]
              for name, recs in (("before", before), ("after", after))}
    gain = {k: phases["after"].aggregate[k] - v for k, v in phases["before"].aggregate.items()
            if k.startswith(VAL_PREFIX) and k in phases["after"].aggregate}
    return {"method": cfg.personalize, "epochs": cfg.personalize_epochs,
            **{name: {"mean": p.aggregate, "sites": p.sites} for name, p in phases.items()},
            "gain": gain}


def write_personalization(run_dir: Path, personal: dict[str, Any]) -> None:
    """Add the personalisation phase to the run's metrics.json (after its last round's
    record, which nothing rewrites afterwards)."""
    path = run_dir / METRICS_FILE
    write_json(path, json.loads(path.read_text()) | {"personalization": personal})


def xval_row(metrics: dict[str, float]) -> dict[str, float]:
    """One site's evaluation as a cross-site matrix entry: no ``val-`` prefix, no ``t-*``."""
    return {k[len(VAL_PREFIX):] if k.startswith(VAL_PREFIX) else k: v
            for k, v in metrics.items() if not k.startswith(TIMING_PREFIX)}


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
        matrix[name][site] = xval_row(metric_dict(reply.content))
    return matrix


def publish_evaluation(m: ServerMetrics, phase: Phase) -> None:
    """The sites' latest evaluation of a global model, weighted by their sample counts."""
    for k, v in phase.aggregate.items():
        if k.startswith(VAL_PREFIX):
            m.federated.labels(metric=k[len(VAL_PREFIX):]).set(v)


def update_metrics(m: ServerMetrics, record: RoundRecord, arrays: ArrayRecord, *,
                   connected: int, evaluated: Phase | None = None) -> None:
    """Publish one finished round's record as Prometheus series (``evaluated``: the
    sites' evaluation of the previous round's model, which came with this round)."""
    participating = record.participating
    m.round.set(record.round)
    m.participating.set(participating)
    m.dropped.set(max(connected - participating, 0))
    m.bytes_in.inc(record.train.bytes_in if record.train else 0)
    evaluated_here = len(record.evaluate.sites) if record.evaluate else 0
    m.bytes_out.inc(arrays.count_bytes() * (participating + evaluated_here))
    if record.train and "train-loss" in record.train.aggregate:
        m.train_loss.set(record.train.aggregate["train-loss"])
    for k, v in record.heldout.items():
        m.heldout.labels(metric=k).set(v)
    for phase in (evaluated, record.evaluate):
        if phase is not None:
            publish_evaluation(m, phase)
    timing = record.timing
    if timing is None:
        return
    m.round_seconds.set(timing.round_s)
    phases = {"round": timing.round_s, "aggregate": timing.aggregate_s,
              "heldout": timing.heldout_s, "checkpoint": timing.checkpoint_s,
              "overhead": timing.overhead_s, "site:slowest-train": timing.slowest_train_s}
    for e in timing.exchanges:
        phases[f"exchange:{e.name}"] = phases.get(f"exchange:{e.name}", 0.0) + e.seconds
    phases |= {f"site:{k}": v for k, v in timing.site_max.items()}
    for name, seconds in phases.items():
        m.phase_seconds.labels(phase=name).set(seconds)
    m.overhead_ratio.set(timing.overhead_fraction)
    m.exchanges.set(len(timing.exchanges))


@app.main()
def main(grid: Grid, context: Context) -> None:
    quick_object_pulls()  # the grid pulls each reply's objects (fedpacs.common.flowertune)
    install_sigterm_handler()
    # a resume comes from the run's server.json alone, never from its app
    app_config = {k: v for k, v in context.run_config.items() if k != RESUME_KEY}
    server_side = read_server_side(str(app_config.get("run-name", "")))
    flat = app_config | {k.replace("_", "-"): v for k, v in server_side.items()}
    run_federation(grid, RunConfig.from_flat(flat), context)
