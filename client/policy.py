"""The site's own policy over what a run asks of it, checked on every message.

Whatever the server's instructions say, a site trains only within the ceilings of its
``[security]`` table: allowed networks, a round limit, a required local-DP epsilon (and,
in fedpacs.client.secagg_policy, the SecAgg+ floor). Each refusal is a PolicyError naming the
security field, what the run asked and the fix; the server gets only its code (FP010).
"""

from __future__ import annotations

from fedpacs.client.config import SiteConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import FieldError, PolicyError
from fedpacs.common.tasks import TaskConfig


def policy_problems(site: SiteConfig, ins: RoundInstructions, task: TaskConfig, *,
                    training: bool) -> list[FieldError]:
    """Every way ``ins`` (resolved to ``task``) exceeds this site's ceilings."""
    sec = site.security
    errs: list[FieldError] = []
    if sec.allowed_networks and task.network not in sec.allowed_networks:
        errs.append(FieldError("security.allowed_networks", f"a run of one of "
                               f"{', '.join(sec.allowed_networks)}", repr(task.network),
                               "ask the coordinator for an allowed network, or add it here"))
    if not training:
        return errs
    if sec.max_rounds and ins.server_round > sec.max_rounds:
        errs.append(FieldError("security.max_rounds", f"round <= {sec.max_rounds}",
                               f"round {ins.server_round}", "raise max_rounds if this site "
                               "agrees to train longer"))
    if sec.max_dp_epsilon > 0 and not (ins.dp_clip > 0 and ins.dp_epsilon <= sec.max_dp_epsilon):
        got = (f"local DP with epsilon {ins.dp_epsilon:g}" if ins.dp_clip > 0
               else "no local DP (dp-clip 0)")
        errs.append(FieldError("security.max_dp_epsilon",
                               f"local DP with epsilon <= {sec.max_dp_epsilon:g}", got,
                               "ask for a run with --dp-clip and a small enough --dp-epsilon"))
    return errs


def enforce(site: SiteConfig, ins: RoundInstructions, task: TaskConfig, *,
            training: bool) -> None:
    errs = policy_problems(site, ins, task, training=training)
    if errs:
        raise PolicyError(f"the run's instructions for round {ins.server_round}", errs)
