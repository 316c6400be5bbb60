"""The Flower app of one run: a folder whose components point at the installed fedpacs
package and whose run config is the RunConfig, signed with the coordinator's app key
(sites run only apps signed by a key they trust; see fedpacs.client.gate)."""

from __future__ import annotations

import json
from pathlib import Path

from fedpacs.common.config import RunConfig
from fedpacs.common.signing import sign_app

APP_PUBLISHER = "fedpacs"
APP_NAME = "fedpacs-app"


def _toml_value(v: bool | int | float | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)


def write_app(app_dir: Path, cfg: RunConfig, *, signing_key: Path | None = None) -> Path:
    """Write the app for ``cfg`` and, with ``signing_key`` (the app-signing key), sign it.
    The app carries ``cfg.to_app_config()`` only: no coordinator path or key travels to a
    site (and sites read their own paths from their own config files)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
        'description = "fedpacs federated run (components installed with fedpacs)"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", f'publisher = "{APP_PUBLISHER}"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedpacs.server.app:app"',
        'clientapp = "fedpacs.client.app:app"', "", "[tool.flwr.app.config]",
    ]
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in cfg.to_app_config().items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if signing_key is not None:
        sign_app(app_dir, signing_key)
    return app_dir
