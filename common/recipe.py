"""A run's training recipe: augmentation, loss, class imbalance, optimiser, learning-rate
schedule, gradient clipping, frozen layers and evaluation-time uncertainty.

One typed record, :class:`Recipe`, holds every choice and its default (the one place they
live: :class:`fedpacs.common.config.RunConfig` takes its defaults from ``DEFAULT_RECIPE``).
It travels to the sites inside the round's instructions as JSON and is checked again there
(:meth:`Recipe.from_json`): a site trains only recipes this code knows. What it costs a
site's machine stays the site's own choice (``[compute]``: device, AMP, loader workers).

The learning rate of a round is computed by the server from the run's base rate, the
round and the schedule (:func:`round_lr`) and sent as the round's ``lr``: every site of a
round trains with the same rate, and a resumed run continues the schedule where it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from fedpacs.common.errors import ConfigError, FieldError, did_you_mean
from fedpacs.common.flat import read_flat

AUGMENTATIONS = ("flip", "rotate", "scale", "elastic", "intensity")
LOSSES = ("auto", "ce", "focal", "dice", "dice-ce", "dice-focal")
SEGMENTATION_LOSSES = ("dice", "dice-ce", "dice-focal")
CLASSIFICATION_LOSSES = ("ce", "focal")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")
FREEZE = ("none", "features")
UNCERTAINTY = ("none", "mc-dropout", "tta")
MAX_UNCERTAINTY_SAMPLES = 64


@dataclass(frozen=True)
class Recipe:
    """How each site trains a round (defaults: today's recipe, Adam at a fixed rate)."""

    # comma-separated subset of AUGMENTATIONS ("" none, "all" every one); training split only,
    # seeded per site and round
    augment: str = ""
    loss: str = "auto"  # auto: dice-ce for segmentation, ce for classification
    class_weights: str = "none"  # balanced: inverse class frequency of the site's train split
    focal_gamma: float = 2.0
    sampler: str = "shuffle"  # balanced: each class drawn equally often (classification)
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # over the run's rounds (round_lr)
    warmup_rounds: int = 0  # linear warm-up from lr / (warmup_rounds + 1)
    grad_clip: float = 0.0  # max L2 norm of the gradients per step; 0: off
    freeze: str = "none"  # features: train only the head (transfer learning)
    uncertainty: str = "none"  # evaluation: mc-dropout or test-time augmentation
    uncertainty_samples: int = 8

    def augmentations(self) -> tuple[str, ...]:
        if self.augment.strip() == "all":
            return AUGMENTATIONS
        return tuple(a.strip() for a in self.augment.split(",") if a.strip())

    def loss_for(self, kind: str) -> str:
        """The loss a task of ``kind`` trains with (``auto`` resolved)."""
        if self.loss != "auto":
            return self.loss
        return "dice-ce" if kind == "segmentation" else "ce"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "recipe") -> Recipe:
        """Parse a recipe received from elsewhere (types and values checked)."""
        try:
            raw = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(source, [FieldError("recipe", "a JSON object", str(exc),
                                                  "run the same fedpacs version")]) from None
        if not isinstance(raw, dict):
            raise ConfigError(source, [FieldError("recipe", "a JSON object",
                                                  type(raw).__name__, "run the same fedpacs "
                                                  "version")])
        return cls.from_mapping(raw, source=source)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: str = "recipe") -> Recipe:
        values, errs = read_flat(cls, raw, prefix="recipe.")
        if errs:
            raise ConfigError(source, errs)
        recipe = cls(**values)
        errs = recipe.validate()
        if errs:
            raise ConfigError(source, errs)
        return recipe

    def validate(self, kind: str = "", *, has_dropout: bool | None = None
                 ) -> list[FieldError]:
        """Every problem with this recipe; with ``kind`` also whether it fits the task
        (a segmentation loss for a classifier, a balanced sampler for segmentation), with
        ``has_dropout`` whether MC dropout has dropout layers to sample."""
        errs: list[FieldError] = []

        def choice(name: str, value: str, choices: tuple[str, ...], fix: str) -> None:
            if value not in choices:
                errs.append(FieldError(name, f"one of {', '.join(choices)}", repr(value),
                                       fix + did_you_mean(value, list(choices))))

        for a in self.augmentations():
            if a not in AUGMENTATIONS:
                errs.append(FieldError("augment", "a comma-separated list of "
                                       f"{', '.join(AUGMENTATIONS)} (or all, or empty)",
                                       repr(self.augment), "name the augmentations"
                                       + did_you_mean(a, list(AUGMENTATIONS))))
        choice("loss", self.loss, LOSSES, "pick a loss")
        choice("class-weights", self.class_weights, CLASS_WEIGHTS, "pick none or balanced")
        choice("sampler", self.sampler, SAMPLERS, "pick shuffle or balanced")
        choice("optimizer", self.optimizer, OPTIMIZERS, "pick an optimiser")
        choice("lr-schedule", self.lr_schedule, LR_SCHEDULES, "pick a schedule")
        choice("freeze", self.freeze, FREEZE, "pick none or features")
        choice("uncertainty", self.uncertainty, UNCERTAINTY, "pick an uncertainty method")
        for name, lo, hi in (("focal_gamma", 0.0, 10.0), ("momentum", 0.0, 0.999),
                             ("weight_decay", 0.0, 1.0), ("grad_clip", 0.0, 1e6)):
            v = getattr(self, name)
            if not (math.isfinite(v) and lo <= v <= hi):
                errs.append(FieldError(name.replace("_", "-"), f"a number in [{lo:g}, {hi:g}]",
                                       repr(v), "use the default"))
        if not 0 <= self.warmup_rounds <= 1000:
            errs.append(FieldError("warmup-rounds", "an integer in 0..1000",
                                   repr(self.warmup_rounds), "e.g. warmup-rounds = 1"))
        if not 2 <= self.uncertainty_samples <= MAX_UNCERTAINTY_SAMPLES:
            errs.append(FieldError("uncertainty-samples", f"an integer in 2.."
                                   f"{MAX_UNCERTAINTY_SAMPLES}", repr(self.uncertainty_samples),
                                   "e.g. uncertainty-samples = 8"))
        if kind == "classification" and self.loss in SEGMENTATION_LOSSES:
            errs.append(FieldError("loss", f"a classification loss: auto, "
                                   f"{', '.join(CLASSIFICATION_LOSSES)}", repr(self.loss),
                                   "use ce or focal for a classifier"))
        if kind == "segmentation" and self.loss in CLASSIFICATION_LOSSES:
            errs.append(FieldError("loss", f"a segmentation loss: auto, "
                                   f"{', '.join(SEGMENTATION_LOSSES)}", repr(self.loss),
                                   "use dice, dice-ce or dice-focal for a segmenter"))
        if kind == "segmentation" and self.sampler == "balanced":
            errs.append(FieldError("sampler", "shuffle for segmentation (every image holds "
                                   "every class; weigh classes with class-weights)",
                                   repr(self.sampler), "set sampler = shuffle and "
                                   "class-weights = balanced"))
        if self.uncertainty == "mc-dropout" and has_dropout is False:
            errs.append(FieldError("uncertainty", "tta for a network without dropout layers",
                                   "'mc-dropout'", "use uncertainty = tta, or a network "
                                   "with dropout (alexnet, vgg16, googlenet)"))
        return errs


DEFAULT_RECIPE = Recipe()


def round_lr(base: float, server_round: int, rounds: int, recipe: Recipe) -> float:
    """The learning rate of round ``server_round`` (1-based) of a ``rounds``-round run:
    linear warm-up over ``warmup_rounds``, then constant, cosine to 0 at the run's end,
    or divided by 10 at half and three quarters of the run (step)."""
    r = max(server_round, 1)
    w = recipe.warmup_rounds
    if r <= w:
        return base * r / (w + 1)
    if recipe.lr_schedule == "constant" or rounds <= w:
        return base
    # 0 at the first round after warm-up, 1 at the run's end; a round past the run's last
    # round keeps the last round's rate (the cosine does not rise again)
    t = (min(r, rounds) - w - 1) / max(rounds - w, 1)
    if recipe.lr_schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    return base * (0.1 ** sum(t >= m for m in (0.5, 0.75)))  # step


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """A site's seed for round ``server_round`` of a run seeded ``seed``: its sampling,
    augmentation and uncertainty draws differ from every other site's (``partition``) and
    round's, and repeat when run again. The baselines (fedpacs.server.baseline) train and
    evaluate their epoch blocks with the same seeds."""
    return seed * 1_000_003 + server_round * 101 + partition
