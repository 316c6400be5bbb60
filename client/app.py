"""The Flower ClientApp every site runs (``fedpacs.client.app:app``).

The site's config file is named by the SuperNode's ``--node-config site-config=...``; it
is read here, on the site, and never travels from the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpacs.client.metrics import site_metrics
from fedpacs.client.trainer import evaluate_round, train_round
from fedpacs.common.config import SITE_CONFIG_NODE_KEY, SiteConfig, load_site_config
from fedpacs.common.errors import FedpacsError, describe

log = logging.getLogger("fedpacs.site")

app = ClientApp()


def site_error_reply(msg: Message, err: FedpacsError) -> Message:
    """An error reply that carries only a code and the exception type (no file names)."""
    reason = f"FP{int(err.code):03d} {type(err).__name__}: {describe(err.code)}"
    return Message(error=Error(code=int(err.code), reason=reason), reply_to=msg)


def handle(msg: Message, context: Context,
           work: Callable[[SiteConfig, RecordDict, RecordDict], RecordDict]) -> Message:
    try:
        site = load_site_config(str(context.node_config.get(SITE_CONFIG_NODE_KEY, "")) or None)
        return Message(content=work(site, msg.content, context.state), reply_to=msg)
    except FedpacsError as err:
        log.error("site refused message %s: %s", msg.metadata.message_type, err)
        site_metrics().errors.labels(code=str(int(err.code))).inc()
        return site_error_reply(msg, err)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context, train_round)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context, evaluate_round)
