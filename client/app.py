"""The Flower ClientApp every site runs (``fedpacs.client.app:app``).

The site's config file is named by the SuperNode's ``--node-config site-config=...``; it
is read here, on the site, and never travels from the server. A virtual site of `fedpacs
simulate` (no ``site-config``) reads its generated config by the ``partition-id`` Flower's
Simulation Engine gave its node, in the folder its own environment names
(:func:`simulated_site_config`).

Train messages come in two forms:

* plain (``secagg = false``): the global model as a named ArrayRecord; the reply carries
  this site's weights, which the server sees;
* SecAgg+ (the default): Flower's ``secaggplus_mod`` runs the key exchange, calls the
  training handler with the legacy ``fitins`` records, then quantises and masks the reply
  so that only the sum over sites can be unmasked by the server.

Torch, MONAI and the data code are imported inside the handlers: the SecAgg+ key-exchange
stages, which never train, then start in about a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from fedpacs.client import timing
from fedpacs.client.metrics import site_metrics
from fedpacs.client.secagg_policy import SECAGG_ROUND_KEY, check_secagg_request
from fedpacs.common.contract import (
    CONFIG_KEY,
    LEGACY_FIT_ARRAYS,
    LEGACY_FIT_CONFIG,
    RoundInstructions,
)
from fedpacs.common.errors import (
    ConfigError,
    ExitCode,
    FedpacsError,
    FieldError,
    PolicyError,
    coded_reason,
    parse_coded,
)

if TYPE_CHECKING:
    from fedpacs.client.config import SiteConfig

log = logging.getLogger("fedpacs.site")

SECAGG_CONFIG_KEY = RECORD_KEY_CONFIGS  # the config record SecAgg+ messages carry

Work = Callable[["SiteConfig", RecordDict, RecordDict], RecordDict]


def is_coded(reason: str) -> bool:
    """True for fedpacs' own error reason: a code, a type name and that code's help text."""
    return parse_coded(reason) is not None


def coded_reply(msg: Message, code: ExitCode, type_name: str) -> Message:
    """An error reply that carries only a code, a type name and that code's help text (no
    file names, no exception message): the one format :func:`is_coded` accepts."""
    return Message(error=Error(code=int(code), reason=coded_reason(code, type_name)),
                   reply_to=msg)


def site_error_reply(msg: Message, err: FedpacsError) -> Message:
    """An error reply for a fedpacs error: its code and its type."""
    return coded_reply(msg, err.code, type(err).__name__)


def refuse(msg: Message, err: FedpacsError) -> Message:
    """Log the full reason here, count it, and reply with the code alone."""
    log.error("site refused message %s: %s", msg.metadata.message_type, err)
    site_metrics().errors.labels(code=str(int(err.code))).inc()
    return site_error_reply(msg, err)


def load_site(context: Context) -> SiteConfig:
    from fedpacs.client.config import SITE_CONFIG_NODE_KEY, load_site_config

    given = str(context.node_config.get(SITE_CONFIG_NODE_KEY, ""))
    return load_site_config(given or simulated_site_config(context.node_config))


# `fedpacs simulate` (fedpacs.deploy.simulate) sets this in its own Ray workers' environment
# alone: the folder of the virtual sites' generated configs. Never read from a message.
SIM_SITES_ENV = "FEDPACS_SIM_SITES"
SIM_PARTITION_KEY = "partition-id"  # set by Flower's Simulation Engine per virtual node


def sim_site_file(folder: Path, partition: int) -> Path:
    """The generated site config of virtual site ``partition`` in ``folder``."""
    return folder / f"site-{partition:03d}.toml"


def simulated_site_config(node_config: Mapping[str, object]) -> str | None:
    """A virtual site's config under Flower's Simulation Engine, or None (a deployed site).

    Only where this process's own environment has ``$FEDPACS_SIM_SITES`` (set by `fedpacs
    simulate` for its Ray workers) and the node has no ``site-config``: the site is the
    file for the node's ``partition-id``, which the Simulation Engine sets when it creates
    the node, in the same process, never from a message. The path is built from an
    integer inside that folder, so nothing the server sends (run config, message content)
    can name a file; a deployed SuperNode always has its ``site-config``, which wins."""
    folder = os.environ.get(SIM_SITES_ENV, "")
    if not folder:
        return None
    pid = node_config.get(SIM_PARTITION_KEY)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise ConfigError("simulation node config", [FieldError(
            SIM_PARTITION_KEY, "the virtual node's partition id (an integer >= 0, set by "
            "Flower's Simulation Engine)", repr(pid), "run virtual sites with `fedpacs "
            "simulate`; a deployed SuperNode sets --node-config site-config=...")])
    return str(sim_site_file(Path(folder), pid))


def handle(msg: Message, context: Context, work: Work) -> Message:
    try:
        site = load_site(context)
        return Message(content=work(site, msg.content, context.state), reply_to=msg)
    except FedpacsError as err:
        return refuse(msg, err)


def site_boundary_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The outermost layer of every reply that leaves the site: any exception (a
    FileNotFoundError naming a cache path and a SeriesInstanceUID, say) becomes a code and
    its type name, with the details in the site's own log; an error reply that is not
    fedpacs' own coded one is rewritten the same way. Flower would otherwise send
    ``str(exception)`` to the server."""
    try:
        out = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - the site boundary: nothing may pass uncoded
        log.exception("site error on message %s (kept on this site)", msg.metadata.message_type)
        site_metrics().errors.labels(code=str(int(ExitCode.FAILURE))).inc()
        return coded_reply(msg, ExitCode.FAILURE, type(exc).__name__)
    if out.has_error() and not is_coded(out.error.reason or ""):
        log.error("site error reply rewritten before it left: %s", out.error.reason)
        return coded_reply(msg, ExitCode.FAILURE, "SiteError")
    return out


def is_secagg(msg: Message) -> bool:
    return SECAGG_CONFIG_KEY in msg.content.config_records


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Runs Flower's SecAgg+ protocol on SecAgg+ messages. A site whose config says
    ``require_secagg = true`` refuses a plain train message (its weights would be seen)."""
    if is_secagg(msg):
        return _secagg(msg, context, call_next)
    if msg.metadata.message_type == "train":
        try:
            site = load_site(context)
            if site.require_secagg:
                raise PolicyError("a plain train message", [FieldError(
                    "security.require_secagg", "a SecAgg+ run (secagg = true)",
                    "a plain train message (secagg = false)",
                    "ask the coordinator to start the run with SecAgg+, or set "
                    "require_secagg = false in this site's [security] table")])
        except FedpacsError as err:
            return refuse(msg, err)
    return call_next(msg, context)


class _Refused(Exception):
    def __init__(self, reply: Message) -> None:
        super().__init__("site refused the round")
        self.reply = reply


def _secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod, behind this site's own SecAgg+ policy.

    Before the mod runs a stage, the request is checked against the site's [security]
    floor and against what the site agreed to at setup (``check_secagg_request``); a
    request that breaks it gets the coded error reply (the reasons stay in the site log)
    and the site forgets this round's secrets, so that nothing more can be asked of them.

    When the site refuses to train (an error reply, already logged with its reason) that
    reply goes back as it is: the site drops out of this round and the server unmasks the
    others from their shares."""

    records = context.state.config_records
    is_setup = msg.content.config_records[SECAGG_CONFIG_KEY].get(Key.STAGE) == Stage.SETUP
    if msg.metadata.message_type == "train":
        try:
            _check_secagg_policy(msg, context)
        except FedpacsError as err:
            records.pop(RECORD_KEY_STATE, None)
            records.pop(SECAGG_ROUND_KEY, None)
            return refuse(msg, err)

    def train_or_refuse(m: Message, c: Context) -> Message:
        out = call_next(m, c)
        if out.has_error():
            raise _Refused(out)
        # the mod quantises the update next, rounding each value up or down at random
        # (numpy's global generator): drawn from a seed of this update, the same update
        # rounds the same way, so a SecAgg+ run repeats bit for bit
        np.random.seed(rounding_seed(out.content))
        return out

    rng = np.random.get_state()
    try:
        reply = secaggplus_mod(msg, context, train_or_refuse)
    except _Refused as refused:
        return refused.reply
    finally:
        np.random.set_state(rng)
    if msg.metadata.message_type == "train" and is_setup and not reply.has_error():
        records[SECAGG_ROUND_KEY] = ConfigRecord({"group_id": msg.metadata.group_id})
    return reply


def rounding_seed(content: RecordDict) -> int:
    """The seed of this site's SecAgg+ stochastic rounding for one update: a hash of the
    update itself (its arrays, in order). No one else chooses it, and it reveals nothing
    the masked sum does not: only the sum of the rounded values is ever unmasked."""
    digest = hashlib.sha256(b"fedpacs/secagg-rounding/1")
    for name in sorted(content.array_records):
        record = content.array_records[name]
        for key in record:
            digest.update(key.encode())
            digest.update(record[key].data)
    return int.from_bytes(digest.digest()[:4], "little")  # numpy's legacy seed: < 2**32


def _check_secagg_policy(msg: Message, context: Context) -> None:
    """Raise PolicyError when this SecAgg+ stage request breaks the site's own policy."""

    site = load_site(context)
    records = context.state.config_records
    request = msg.content.config_records[SECAGG_CONFIG_KEY]
    setup_round = records.get(SECAGG_ROUND_KEY, ConfigRecord()).get("group_id")
    errors = check_secagg_request(
        request, records.get(RECORD_KEY_STATE, ConfigRecord()), site.security,
        round_id=msg.metadata.group_id,
        setup_round_id=setup_round if isinstance(setup_round, str) else None)
    if errors:
        raise PolicyError(f"SecAgg+ {request.get(Key.STAGE)!r} request from the server",
                          errors)


app = ClientApp(mods=[site_boundary_mod, secure_aggregation_mod])


def train_work(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """One round of local training, for either message form."""
    from fedpacs.client.secure import from_fitins, to_fitres
    from fedpacs.client.trainer import train_round

    if LEGACY_FIT_ARRAYS in content.array_records:
        # (the batch counters grow each round and would leave SecAgg+'s clip range)
        reply = train_round(site, from_fitins(content), state, counters=False)
        return to_fitres(reply, content)
    return train_round(site, content, state)


def with_local_dp(msg: Message, context: Context, inner: ClientAppCallable) -> Message:
    """Flower's LocalDpMod around the training handler when the run asks for it
    (``dp-clip > 0``): the update is clipped to that L2 norm and Gaussian noise added."""
    try:
        ins = round_instructions(msg)
    except FedpacsError as err:
        return refuse(msg, err)
    clip, eps, delta = ins.dp_clip, ins.dp_epsilon, ins.dp_delta
    if clip <= 0:
        return inner(msg, context)
    log.info("local DP on this update: clip %.3g, epsilon %.3g, delta %.3g", clip, eps, delta)
    scalars = {k for rec in msg.content.array_records.values() for k in rec.keys()
               if rec[k].numpy().ndim == 0}  # (legacy records carry no shape metadata)
    out = LocalDpMod(clip, clip, eps, delta)(msg, context, _float_arrays(inner))
    return _reshape(out, lambda k, a: a.reshape(()) if k in scalars else a)


def round_instructions(msg: Message) -> RoundInstructions:
    """The round's instructions from either message form (plain or SecAgg+ legacy)."""
    for key in (CONFIG_KEY, LEGACY_FIT_CONFIG):
        if key in msg.content.config_records:
            return RoundInstructions.from_record(msg.content.config_records[key])
    raise ConfigError("message from the server", [FieldError(
        f"{CONFIG_KEY} record", "the round's instructions", "a message without them",
        "run the same fedpacs version on server and site")])


def _float_arrays(inner: ClientAppCallable) -> ClientAppCallable:
    """Integer buffers (BatchNorm's step counters) as float and 0-d entries as 1-element
    vectors, so that LocalDpMod's in-place clipping and noise reach every entry (it
    cannot scale a 0-d difference in place); the server casts integers back."""
    def call(msg: Message, context: Context) -> Message:
        return _reshape(inner(msg, context), lambda k, a: (
            a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float32)).reshape(
            a.shape or (1,)))
    return call


def _reshape(out: Message, fn: Callable[[str, np.ndarray], np.ndarray]) -> Message:
    if out.has_error():
        return out
    for key, rec in list(out.content.array_records.items()):
        out.content[key] = ArrayRecord({k: Array(fn(k, rec[k].numpy())) for k in rec.keys()})
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    import fedpacs.client.trainer  # noqa: F401  (torch, MONAI: t-imports, not t-data)

    timing.mark(timing.READY)
    return with_local_dp(msg, context, lambda m, c: handle(m, c, train_work))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedpacs.client.trainer import evaluate_round

    timing.mark(timing.READY)
    return handle(msg, context, evaluate_round)
