"""The server -> site contract of one round, as one typed record used by both sides.

The ServerApp builds :class:`RoundInstructions` from its RunConfig and sends it as the
message's ConfigRecord (``to_record``); the site reads it back with ``from_record``, which
checks every key's presence and type (no string keys read back with local defaults). What
a site then *does* with it is still its own policy (fedpacs.client.config.SecurityConfig).

SecAgg+ train messages use Flower's legacy layout: the same record travels as
``fitins.config`` beside the model in ``fitins.parameters``.

A reply's metrics are one flat record (Flower's strategies want exactly one, with the same
keys from every site), so three kinds share it, told apart by name (:func:`split_metrics`):
the message's own metrics (weighted by ``num-examples``), the sites' evaluation of the
incoming global model folded into a train reply (``val-*``, weighted by
``val-num-examples``; :func:`fold_evaluation`) and the seconds the site spent per phase
(``t-*``, :data:`TIMING_KEYS`, always all of them so that every site sends the same keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.recipe import Recipe, round_lr

# Keys of the records inside a Flower message (FedAvg uses "arrays" and "config").
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"  # the round's instructions in plain messages
METRICS_KEY = "metrics"
SITE_KEY = "site"
XVAL_MODEL_KEY = "xval-model"  # which model a cross-site validation message carries
XVAL_GLOBAL = "global"  # ... the global one (every other name is a site's local model)
SHARE_LOCAL_MODEL_KEY = "share-local-model"  # a site's consent, in its train reply
NUM_EXAMPLES = "num-examples"  # the weighting key FedAvg reads from each reply's metrics
FEDBN_RESTORED = "fedbn-restored"  # normalisation entries an evaluation took from the site
VAL_PREFIX = "val-"  # a validation metric (an evaluate reply's, or folded into a train reply)
VAL_NUM_EXAMPLES = "val-num-examples"  # the folded evaluation's weighting key
TIMING_PREFIX = "t-"
# the seconds a site spent on a message, per phase (fedpacs.client.timing.phases): every
# reply carries all of them (0.0 for a phase the message did not go through)
TIMING_KEYS = ("t-site", "t-start", "t-imports", "t-data", "t-evaluate", "t-train")
# SecAgg+ train messages (Flower's legacy fitins layout)
LEGACY_FIT_CONFIG = "fitins.config"  # SecAgg+ train messages (Flower's legacy fitins)
LEGACY_FIT_ARRAYS = "fitins.parameters"


# fields a record may leave out (an older server's evaluate messages), with their value
OPTIONAL_FIELDS: dict[str, str | int] = {"xval_model": "", "personalize_epochs": 0}
TUNED_PREFIX = "tuned-"  # a personalised (fine-tuned) model's metrics in an evaluate reply


def _key(name: str) -> str:
    return XVAL_MODEL_KEY if name == "xval_model" else name.replace("_", "-")


@dataclass(frozen=True)
class RoundInstructions:
    """What the server asks of a site for one round. Keys on the wire are the field
    names with '-' for '_'; Flower's strategies set ``server-round`` themselves."""

    task: str
    server_round: int
    local_epochs: int
    batch_size: int
    lr: float
    seed: int
    network: str
    task_json: str
    proximal_mu: float
    fedbn: bool
    secagg: bool
    secagg_clip: float
    secagg_max_weight: float
    dp_clip: float
    dp_epsilon: float
    dp_delta: float
    recipe: str  # the run's training recipe as JSON (fedpacs.common.recipe.Recipe)
    xval_model: str = ""  # which model a cross-site validation message carries
    # train messages: first evaluate the incoming global model on the validation split and
    # fold its metrics into the reply (one exchange per round instead of train + evaluate)
    evaluate_first: bool = False
    # evaluate messages: fine-tune the incoming model this many epochs on the site's
    # training split first and report its validation metrics before and after
    # (``tuned-*``, :func:`personal_metrics`); 0: evaluate only
    personalize_epochs: int = 0

    @classmethod
    def for_round(cls, cfg: RunConfig, server_round: int, *, xval_model: str = "",
                  fedbn: bool | None = None, evaluate_first: bool = False,
                  personalize_epochs: int = 0) -> RoundInstructions:
        """The instructions of round ``server_round`` of run ``cfg`` (no server paths); the
        round's learning rate follows the run's schedule."""
        recipe = cfg.recipe()
        return cls(task=cfg.task, server_round=server_round, local_epochs=cfg.local_epochs,
                   batch_size=cfg.batch_size, seed=cfg.seed, network=cfg.network,
                   lr=round_lr(cfg.lr, server_round, cfg.rounds, recipe),
                   recipe=recipe.to_json(),
                   task_json=cfg.task_json, proximal_mu=cfg.proximal_mu,
                   fedbn=cfg.fedbn if fedbn is None else fedbn, secagg=cfg.secagg,
                   secagg_clip=cfg.secagg_clip, secagg_max_weight=cfg.secagg_max_weight,
                   dp_clip=cfg.dp_clip, dp_epsilon=cfg.dp_epsilon, dp_delta=cfg.dp_delta,
                   xval_model=xval_model, evaluate_first=evaluate_first,
                   personalize_epochs=personalize_epochs)

    def training_recipe(self, kind: str) -> Recipe:
        """The recipe this round carries, checked here as any input from the server is
        (known choices, values in range, fitting a task of ``kind``)."""
        recipe = Recipe.from_json(self.recipe, source="round instructions from the server")
        errs = recipe.validate(kind)
        if errs:
            raise ConfigError("round instructions from the server", errs)
        return recipe

    def to_dict(self) -> dict[str, bool | int | float | str]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, record: ConfigRecord | dict[str, Any]) -> RoundInstructions:
        """Parse and check a received record; ConfigError names every bad or missing key."""
        errs: list[FieldError] = []
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _key(f.name)
            if key not in record:
                if f.name in OPTIONAL_FIELDS:
                    values[f.name] = OPTIONAL_FIELDS[f.name]
                    continue
                errs.append(FieldError(f"config.{key}", "a value from the server", "nothing",
                                       "run the same fedpacs version on server and site"))
                continue
            v = record[key]
            want = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                errs.append(FieldError(f"config.{key}", want.__name__, repr(v),
                                       "run the same fedpacs version on server and site"))
                continue
            values[f.name] = v
        if errs:
            raise ConfigError("round instructions from the server", errs)
        return cls(**values)


def fold_evaluation(evaluation: Mapping[str, float]) -> dict[str, float]:
    """An evaluate reply's metrics as they travel inside a train reply: every name gets
    the ``val-`` prefix (``num-examples`` -> ``val-num-examples``) so that none of them
    mixes with the training metrics or their weighting."""
    return {k if k.startswith(VAL_PREFIX) else VAL_PREFIX + k: v
            for k, v in evaluation.items()}


def unfold_evaluation(folded: Mapping[str, float]) -> dict[str, float]:
    """The folded metrics back in an evaluate reply's layout (the inverse of
    :func:`fold_evaluation` for the keys an evaluate reply has)."""
    plain = {VAL_PREFIX + k: k for k in (NUM_EXAMPLES, FEDBN_RESTORED)}
    return {plain.get(k, k): v for k, v in folded.items()}


@dataclass(frozen=True)
class ReplyMetrics:
    """A reply's metrics split by what they measure (:func:`split_metrics`)."""

    own: dict[str, float]  # the message's own metrics, weighted by num-examples
    evaluation: dict[str, float]  # a folded evaluation, in evaluate-reply layout ({}: none)
    timing: dict[str, float]  # t-* seconds


def split_metrics(metrics: Mapping[str, float], *, folded: bool) -> ReplyMetrics:
    """Split a reply's metrics: ``t-*`` always; ``val-*`` too when ``folded`` (a train
    reply, whose ``val-*`` are the folded evaluation; an evaluate reply's are its own)."""
    own: dict[str, float] = {}
    evaluation: dict[str, float] = {}
    timing: dict[str, float] = {}
    for k, v in metrics.items():
        if k.startswith(TIMING_PREFIX):
            timing[k] = v
        elif folded and k.startswith(VAL_PREFIX):
            evaluation[k] = v
        else:
            own[k] = v
    if VAL_NUM_EXAMPLES not in evaluation:  # no evaluation without its weight
        evaluation = {}
    return ReplyMetrics(own, unfold_evaluation(evaluation), timing)


def personal_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float],
                                                             dict[str, float]]:
    """An evaluate reply's metrics after personalisation split into (before, after): the
    global model's ``val-*`` and the fine-tuned model's ``tuned-val-*`` (prefix dropped),
    each with ``num-examples``; ``tuned-*`` training figures go with ``after``."""
    before = {k: v for k, v in metrics.items()
              if k.startswith(VAL_PREFIX) or k == NUM_EXAMPLES}
    after = {k[len(TUNED_PREFIX):]: v for k, v in metrics.items()
             if k.startswith(TUNED_PREFIX)}
    if NUM_EXAMPLES in metrics:
        after[NUM_EXAMPLES] = metrics[NUM_EXAMPLES]
    return before, after
