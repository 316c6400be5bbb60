"""The site's side of SecAgg+: legacy ``fitins``/``fitres`` records <-> fedpacs records and
the checks a site makes on its own update before it is quantised and masked (the site's
floor on the protocol itself is fedpacs.client.secagg_policy, which imports no torch).

Under SecAgg+ the server cannot look at one site's update, so the site checks its own:
finite values, and that ``|w| * num_examples / max_weight`` stays inside the clipping
range (otherwise the quantiser would clip it silently and the sum would be wrong).

"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedpacs.common import wire
from fedpacs.common.contract import LEGACY_FIT_ARRAYS, LEGACY_FIT_CONFIG, RoundInstructions
from fedpacs.common.errors import FieldError, UpdateError

if TYPE_CHECKING:

    pass


def from_fitins(content: RecordDict) -> RecordDict:
    """A SecAgg+ train message's content as a fedpacs round (positional arrays)."""
    return RecordDict({wire.ARRAYS_KEY: content.array_records[LEGACY_FIT_ARRAYS],
                       wire.CONFIG_KEY: content.config_records[LEGACY_FIT_CONFIG]})


def check_maskable(values: list[np.ndarray], num_examples: int, *, clip: float,
                   max_weight: float) -> None:
    """Refuse an update that SecAgg+ would corrupt: non-finite values, a weight above
    ``max_weight`` or a scaled value outside ``[-clip, clip]``."""
    errors: list[FieldError] = []
    if num_examples > max_weight:
        errors.append(FieldError("secagg-max-weight", f">= this site's {num_examples} "
                                 "training examples", str(max_weight),
                                 "start the run with a larger --secagg-max-weight"))
    peak = max((float(np.max(np.abs(v))) for v in values if v.size), default=0.0)
    if not np.isfinite(peak):
        errors.append(FieldError("update", "finite values", "NaN/Inf",
                                 "lower the learning rate or check the site's data"))
    elif peak * num_examples / max_weight > clip:
        need = peak * num_examples / max_weight
        errors.append(FieldError("secagg-clip", f">= {need:.3g} (largest |weight| {peak:.3g} "
                                 f"x {num_examples}/{max_weight:g})", str(clip),
                                 "start the run with a larger --secagg-clip"))
    if errors:
        raise UpdateError(errors)


def to_fitres(reply: RecordDict, request: RecordDict) -> RecordDict:
    """A fedpacs train reply as the legacy ``fitres`` records SecAgg+ masks. Metrics and
    the site's name travel in the clear, all of them: the training metrics, the folded
    evaluation of the incoming model (``val-*``) and the site's seconds (``t-*``), which
    the server's ``aggregate_fit`` receives as ``FitRes.metrics``; the weights are masked
    by the mod."""
    ins = RoundInstructions.from_record(request.config_records[LEGACY_FIT_CONFIG])
    metrics = dict(reply.metric_records[wire.METRICS_KEY])
    num_examples = int(metrics[wire.NUM_EXAMPLES])  # type: ignore[arg-type]  # our own reply
    values = wire.to_numpy_list(reply.array_records[wire.ARRAYS_KEY])
    check_maskable(values, num_examples, clip=ins.secagg_clip, max_weight=ins.secagg_max_weight)
    site = reply.config_records.get(wire.SITE_KEY, ConfigRecord())
    fit_metrics = {**{k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
                   "site": str(site.get("name", ""))}
    res = FitRes(status=Status(code=Code.OK, message=""),
                 parameters=ndarrays_to_parameters(values),
                 num_examples=num_examples, metrics=fit_metrics)  # type: ignore[arg-type]
    return compat.fitres_to_recorddict(res, keep_input=True)
