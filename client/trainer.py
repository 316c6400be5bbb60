"""Local training and evaluation of one site, on Flower records in and out.

Only weights, counts and metric values leave the site. Errors that go back to the server
carry an exit code and an exception type; details (file names) stay in the site's log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpacs.client import datacache, policy, timing
from fedpacs.client.config import SiteConfig
from fedpacs.client.metrics import site_metrics
from fedpacs.common import wire
from fedpacs.common.contract import (
    CONFIG_KEY,
    FEDBN_RESTORED,
    NUM_EXAMPLES,
    SHARE_LOCAL_MODEL_KEY,
    TIMING_KEYS,
    TUNED_PREFIX,
    VAL_PREFIX,
    XVAL_GLOBAL,
    RoundInstructions,
    fold_evaluation,
)
from fedpacs.common.datasets import SiteData
from fedpacs.common.engine import TrainParams, evaluate, train
from fedpacs.common.errors import ConfigError, FieldError, PolicyError
from fedpacs.common.models import build_model, norm_state_keys, pick_device
from fedpacs.common.recipe import Recipe, round_seed
from fedpacs.common.tasks import TaskConfig, task_with_network

log = logging.getLogger("fedpacs.site")


def prepare(site: SiteConfig, requested_task: str, network: str = "", task_json: str = ""
            ) -> tuple[TaskConfig, torch.device]:
    """Check the run's task against the site's, set threads, pick the device."""
    if requested_task != site.task:
        raise ConfigError(site.source, [FieldError(
            "site.task", f"the run's task {requested_task!r}", repr(site.task),
            "join this site only to runs of its task, or change site.task if the data fits")])
    if site.compute.threads > 0:
        torch.set_num_threads(site.compute.threads)
    return resolve_task(site, network, task_json), pick_device(site.compute.device)


def resolve_task(site: SiteConfig, network: str, task_json: str) -> TaskConfig:
    """The run's task as this site will train it: a preset, or the custom task the run
    carries, which must equal the one the site declared in its [task] table."""
    if not task_json:
        return task_with_network(site.task, network)
    run_task = TaskConfig.from_dict(json.loads(task_json), source="run task")
    if site.custom_task is None or site.custom_task.to_dict() != run_task.to_dict():
        raise ConfigError(site.source, [FieldError(
            "[task]", f"the run's custom task {run_task.to_dict()}",
            str(site.custom_task.to_dict() if site.custom_task else None),
            "declare the same [task] table in the site config")])
    if network:
        return TaskConfig.from_dict(run_task.to_dict() | {"network": network})
    return run_task


def load_data(site: SiteConfig, task: TaskConfig) -> SiteData:
    """The site's data, warm when this process was forked from a warm site's parent
    (fedpacs.client.datacache); skipped files are logged where the data is loaded."""
    loads = datacache.loads
    data = datacache.site_data(site, task)
    if datacache.loads != loads:
        for path, reason in data.skipped:
            log.warning("site %s skipped %s: %s", site.name, path, reason)
    timing.mark(timing.DATA)
    return data


@dataclass(frozen=True)
class OpenRound:
    """What every round handler starts from: instructions, task, device, data, global model."""

    ins: RoundInstructions
    task: TaskConfig
    device: torch.device
    data: SiteData
    model: torch.nn.Module
    recipe: Recipe
    fedbn_restored: int = 0  # normalisation entries taken from this site's own state
    data_partition: int = 0

    @property
    def seed(self) -> int:
        """This site's seed for the round: its sampling, augmentation and uncertainty
        draws differ from every other site's and round's, and repeat when run again."""
        return round_seed(self.ins.seed, self.ins.server_round, self.data_partition)


FEDBN_STATE_KEY = "fedbn-local"


def open_round(site: SiteConfig, content: RecordDict, state: RecordDict, *,
               training: bool) -> OpenRound:
    """Parse the round's instructions, check them against the site's policy, load the
    site's data and the global weights (with this site's own normalisation layers under
    FedBN, once it has trained)."""
    ins = RoundInstructions.from_record(content.config_records[CONFIG_KEY])
    task, device = prepare(site, ins.task, ins.network, ins.task_json)
    policy.enforce(site, ins, task, training=training)
    recipe = ins.training_recipe(task.kind)
    if not training and ins.xval_model not in ("", XVAL_GLOBAL) \
            and not site.security.share_local_model:
        raise PolicyError("a cross-site validation message", [FieldError(
            "security.share_local_model", "only the global model to evaluate",
            "another site's local model (cross-site validation)",
            "set share_local_model = true if this site takes part in exchanging local models")])
    data = load_data(site, task)
    model = build_model(task)
    wire.load_arrays(model, wire.named_arrays(model, content.array_records[wire.ARRAYS_KEY]))
    restored = 0
    if ins.fedbn and FEDBN_STATE_KEY in state.array_records:
        local = state.array_records[FEDBN_STATE_KEY].to_torch_state_dict()
        model.load_state_dict(local, strict=False)
        restored = len(local)
    return OpenRound(ins, task, device, data, model, recipe, restored, site.data.partition)


def keep_norm_layers(model: torch.nn.Module, state: RecordDict) -> None:
    """FedBN: remember this site's normalisation layers for its next rounds."""
    keys = norm_state_keys(model)
    local = {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keys}
    state[FEDBN_STATE_KEY] = ArrayRecord(torch_state_dict=local)


def evaluation(site: SiteConfig, r: OpenRound) -> dict[str, float]:
    """The round's global model on the site's validation split, as an evaluate reply's
    metrics (``num-examples``, ``fedbn-restored``, ``val-*``): the one evaluation behind
    the evaluate exchange, cross-site validation and the evaluation folded into a train
    reply. The global random state is left as it was, so that training after it draws the
    same numbers as without it."""
    with torch.random.fork_rng(devices=[]):
        values = evaluate(r.model, r.data.val, task=r.task, device=r.device, recipe=r.recipe,
                          seed=r.seed)
    timing.mark(timing.EVALUATED)
    site_metrics().val_samples.set(len(r.data.val))
    log.info("site %s round %d: evaluated on %d samples: %s", site.name, r.ins.server_round,
             len(r.data.val), values)
    return {NUM_EXAMPLES: len(r.data.val), FEDBN_RESTORED: r.fedbn_restored,
            **{f"{VAL_PREFIX}{k}": float(v) for k, v in values.items()}}


def site_timing() -> dict[str, float]:
    """Seconds this message spent per phase, every key of TIMING_KEYS (0.0 for a phase it
    did not go through): Flower's strategies refuse replies whose metric keys differ."""
    phases = timing.phases()
    return {k: float(phases.get(k, 0.0)) for k in TIMING_KEYS}


def train_round(site: SiteConfig, content: RecordDict, state: RecordDict, *,
                counters: bool = True) -> RecordDict:
    """Load the global model from ``content``, train locally, reply with the new weights.
    With ``evaluate-first`` the incoming model is evaluated before training and its
    metrics ride in the reply (``val-*``, weighted by ``val-num-examples``).
    ``counters=False`` (SecAgg+): BatchNorm's batch counters are sent as 0
    (:func:`fedpacs.common.wire.model_to_arrays`)."""
    r = open_round(site, content, state, training=True)
    ins, task, device, data, model = r.ins, r.task, r.device, r.data, r.model
    evaluated = fold_evaluation(evaluation(site, r)) if ins.evaluate_first else {}
    res = train(model, data.train, task=task, device=device, seed=r.seed, recipe=r.recipe,
                amp=site.compute.amp, workers=site.compute.loader_workers,
                params=TrainParams(epochs=ins.local_epochs, batch_size=ins.batch_size,
                                   lr=ins.lr, proximal_mu=ins.proximal_mu))
    timing.mark(timing.TRAINED)
    if ins.fedbn:
        keep_norm_layers(model, state)
    m = site_metrics()
    m.train_seconds.set(res.seconds)
    m.train_samples.set(res.num_examples)
    m.last_round.set(ins.server_round)
    m.rounds.inc()
    m.record_memory()
    if device.type == "cuda":
        m.gpu_peak_memory.set(res.gpu_peak_mb * 2**20)
    log.info("site %s round %d: trained on %d samples in %.1fs (lr %.3g), loss %.4f%s",
             site.name, ins.server_round, res.num_examples, res.seconds, ins.lr, res.loss,
             f", GPU peak {res.gpu_peak_mb:.0f} MiB" if device.type == "cuda" else "")
    metrics = MetricRecord({wire.NUM_EXAMPLES: res.num_examples, "train-loss": res.loss,
                            "train-seconds": res.seconds, **evaluated, **site_timing()})
    return RecordDict({wire.ARRAYS_KEY: wire.model_to_arrays(model, counters=counters),
                       wire.METRICS_KEY: metrics,
                       wire.SITE_KEY: ConfigRecord({
                           "name": site.name,
                           SHARE_LOCAL_MODEL_KEY: site.security.share_local_model})})


def evaluate_round(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Evaluate the global model in ``content`` on the site's validation split; with
    ``personalize-epochs`` also the model fine-tuned from it (:func:`personalize`)."""
    ins = RoundInstructions.from_record(content.config_records[CONFIG_KEY])
    tuning = ins.personalize_epochs > 0  # trains on the site's data: its training policy
    r = open_round(site, content, state, training=tuning)
    values = evaluation(site, r)
    if tuning:
        values |= personalize(site, r, state)
    metrics = MetricRecord({**values, **site_timing()})
    return RecordDict({wire.METRICS_KEY: metrics,
                       wire.SITE_KEY: ConfigRecord({"name": site.name,
                                                    wire.XVAL_MODEL_KEY: r.ins.xval_model})})


PERSONAL_STATE_KEY = "personal-model"


def personalize(site: SiteConfig, r: OpenRound, state: RecordDict) -> dict[str, float]:
    """Local fine-tuning after the federation: train the round's model (the final global
    one, with this site's own normalisation layers under FedBN) for
    ``personalize-epochs`` on the site's training split, with the run's recipe and its
    last round's learning rate, and evaluate it on the validation split. The personal
    model stays in this site's state (never sent); the reply gets its metrics as
    ``tuned-*`` (``tuned-val-*``, ``tuned-train-loss``, ``tuned-epochs``)."""
    ins = r.ins
    res = train(r.model, r.data.train, task=r.task, device=r.device, seed=r.seed,
                recipe=r.recipe, amp=site.compute.amp, workers=site.compute.loader_workers,
                params=TrainParams(epochs=ins.personalize_epochs, batch_size=ins.batch_size,
                                   lr=ins.lr))
    timing.mark(timing.TRAINED)
    state[PERSONAL_STATE_KEY] = ArrayRecord(torch_state_dict={
        k: v.detach().cpu() for k, v in r.model.state_dict().items()})
    after = evaluation(site, r)
    log.info("site %s: fine-tuned the final model for %d epoch(s) on %d samples, "
             "loss %.4f", site.name, ins.personalize_epochs, res.num_examples, res.loss)
    return {**{TUNED_PREFIX + k: v for k, v in after.items() if k.startswith(VAL_PREFIX)},
            f"{TUNED_PREFIX}train-loss": res.loss,
            f"{TUNED_PREFIX}epochs": float(ins.personalize_epochs)}
