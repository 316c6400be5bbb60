"""The site's app gate: a SuperNode runs only apps signed by a key the hospital trusts.

Flower's own ``--trusted-entities`` check accepts only apps verified by the Flower
platform, so fedpacs checks its own signature (``fedpacs-app.sig.json``, Ed25519 over
the SHA-256 of every file; see fedpacs.common.signing). The site daemon puts this
module first on the SuperNode's PATH as ``flwr-clientapp``: every ClientApp process
checks the app bundle against ``security.trusted_app_keys`` *before* installing or
importing any of it, and refuses, saying why in the site's log, when the check fails.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpacs.common.errors import AuthError
from fedpacs.common.signing import verify_fab

TRUST_ENV = "FEDPACS_TRUSTED_APP_KEYS"  # os.pathsep-separated public key files
GATE_COMMAND = "flwr-clientapp"


class AppRefused(AuthError):
    """An app bundle failed the site's signature check."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def checked(install: Callable[..., Any], trusted: list[Path]) -> Callable[..., Any]:
    """``install`` (flwr's install_from_fab) behind the signature check."""
    def install_if_signed(fab: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(fab).hexdigest()[:12]
        try:
            signer = verify_fab(fab, trusted)
        except AuthError as err:
            _say(f"fedpacs app gate: REFUSED app {digest}: {err}")
            raise AppRefused(f"app {digest} refused by the site's app gate: {err}") from err
        _say(f"fedpacs app gate: app {digest} signed by trusted key {signer}")
        return install(fab, *args, **kwargs)
    return install_if_signed


def main() -> None:
    """``flwr-clientapp`` with the signature check in front of the app's installation."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    trusted = [Path(p) for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    runtime.install_from_fab = checked(runtime.install_from_fab, trusted)
    flwr_clientapp()


def install_gate(folder: Path) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``folder`` (to go first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / GATE_COMMAND
    script.write_text(f"#!{sys.executable}\nfrom fedpacs.client.gate import main\n\nmain()\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder
