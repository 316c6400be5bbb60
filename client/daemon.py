"""The site daemon: validate the site config, then run a SuperNode for it.

``fedpacs site start`` refuses to start (exit code 3, every bad field named) when the site
config is invalid, so a hospital never joins a federation it cannot serve.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedpacs.client.config import SITE_CONFIG_NODE_KEY, SiteConfig, load_site_config
from fedpacs.client.data import load_site_data
from fedpacs.client.gate import TRUST_ENV, install_gate
from fedpacs.common.errors import AuthError, ConfigError, DataError, FieldError
from fedpacs.common.procs import child_env, tool
from fedpacs.common.tasks import get_task
from fedpacs.common.telemetry import MULTIPROC_ENV, fresh_dir, serve_multiprocess

log = logging.getLogger("fedpacs.site")


@dataclass(frozen=True)
class SiteSummary:
    site: SiteConfig
    train: int
    val: int
    skipped: list[tuple[str, str]]


def check_site(config_path: Path | None) -> SiteSummary:
    """Parse the site config and load its data once: counts plus skipped files with reasons."""
    site = load_site_config(config_path)
    data = load_site_data(site.data, site.custom_task or get_task(site.task),
                          preprocess=site.preprocess)
    if len(data.train) == 0:
        raise DataError(str(site.data.root), "no usable training samples in this site's "
                        "partition", "check data.root, data.partition and the skipped files")
    return SiteSummary(site, len(data.train), len(data.val), data.skipped)


@dataclass(frozen=True)
class DaemonOptions:
    config: Path | None
    superlink: str
    root_certificates: Path
    auth_key: Path
    runtime_port: int = 9094
    max_wait_s: float | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    state_dir: Path | None = None  # where ClientApp processes write metrics (default: a tmp dir)


def supernode_argv(opts: DaemonOptions, site_config: Path) -> list[str]:
    for field, path in (("--root-certificates", opts.root_certificates),
                        ("--auth-key", opts.auth_key)):
        if not path.is_file():
            raise AuthError(f"{field}: expected an existing file, got {path}. Fix: run "
                            "`fedpacs provision init` at the coordinator and copy the site's "
                            "files here")
    argv = [tool("flower-supernode"), "--superlink", opts.superlink,
            "--root-certificates", str(opts.root_certificates),
            "--auth-supernode-private-key", str(opts.auth_key),
            "--node-config", f'{SITE_CONFIG_NODE_KEY}="{site_config}"',
            "--port", str(opts.runtime_port)]
    if opts.max_wait_s is not None:
        argv += ["--max-wait-time", str(opts.max_wait_s)]
    return argv


def gate_env(site: SiteConfig, state: Path, path: str) -> dict[str, str]:
    """PATH and trust settings that put the app gate in front of every ClientApp."""
    sec = site.security
    if sec.allow_unsigned_apps:
        log.warning("site %s: security.allow_unsigned_apps = true: apps are NOT checked "
                    "against a signature (development only)", site.name)
        return {}
    if not sec.trusted_app_keys:
        raise ConfigError(site.source, [FieldError(
            "security.trusted_app_keys", "at least one public key the site trusts to sign apps",
            "none", "add the coordinator's signing.pub (or, for development only, set "
            "allow_unsigned_apps = true)")])
    gate = install_gate(state / "gate-bin")
    log.info("site %s: runs only apps signed by %s", site.name,
             ", ".join(str(k) for k in sec.trusted_app_keys))
    return {"PATH": f"{gate}{os.pathsep}{path}",
            TRUST_ENV: os.pathsep.join(str(k) for k in sec.trusted_app_keys)}


def run_daemon(opts: DaemonOptions) -> int:
    """Validate, then run the SuperNode in the foreground until it exits or is signalled."""
    summary = check_site(opts.config)
    site_config = Path(summary.site.source)
    argv = supernode_argv(opts, site_config)
    log.info("site %s: %d train / %d val samples; starting SuperNode", summary.site.name,
             summary.train, summary.val)
    env = child_env()
    state = opts.state_dir or Path(tempfile.mkdtemp(prefix=f"fedpacs-{summary.site.name}-"))
    env.update(gate_env(summary.site, state, env["PATH"]))
    if opts.metrics_port:
        mdir = fresh_dir(state / "metrics")
        serve_multiprocess(mdir, opts.metrics_port)
        env[MULTIPROC_ENV] = str(mdir)
        log.info("site %s: metrics on http://127.0.0.1:%d/metrics", summary.site.name,
                 opts.metrics_port)
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()
