"""`fedpacs site ...`: the hospital's commands (check a site, ingest from its PACS, run its
daemon). Each parses, validates and calls one library function in fedpacs.client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from fedpacs.common.errors import ConfigError, ExitCode, FieldError

site_cli = typer.Typer(no_args_is_help=True,
                       help="Hospital side: check a site, ingest from its PACS, run its daemon.")


@site_cli.command("check")
def site_check(
    config: Annotated[Path | None, typer.Option(
        help="site TOML (default: $FEDPACS_SITE_CONFIG)")] = None,
) -> None:
    """Validate a site config and count the samples it would train on."""
    from fedpacs.client.daemon import check_site

    s = check_site(config)
    typer.echo(f"site {s.site.name}: task {s.site.task}, {s.train} training and {s.val} "
               f"validation samples from {s.site.data.root}")
    for path, reason in s.skipped:
        typer.echo(f"  skipped {path}: {reason}")
    for note in s.notes:
        typer.echo(f"  note: {note}")


@site_cli.command("ingest")
def site_ingest(
    config: Annotated[Path | None, typer.Option(
        help="site TOML with [pacs] and [cohort] (default: $FEDPACS_SITE_CONFIG)")] = None,
    method: Annotated[str | None, typer.Option(
        help="override pacs.method: c-get | c-move | dicomweb")] = None,
    from_folder: Annotated[Path | None, typer.Option(
        help="import DICOM files from this folder instead of querying the PACS")] = None,
) -> None:
    """Find the cohort on the PACS, retrieve what the cache lacks, convert to volumes."""
    from fedpacs.client.config import load_site_config
    from fedpacs.client.ingest import import_folder, ingest
    from fedpacs.client.pacs import dicomweb_url_error, is_method, method_error

    method_err = None if method is None else method_error(
        method, field="--method", fix="pass --method c-get, c-move or dicomweb, or leave it "
        "out to use pacs.method from the site config")
    if method_err is not None:
        raise ConfigError("fedpacs site ingest", [method_err])
    site = load_site_config(config)
    if site.ingest is None:
        raise ConfigError(site.source, [FieldError(
            "[pacs]", "a [pacs] table", "nothing",
            'add [pacs] with method, host, port, called_ae, calling_ae (and [cohort])')])
    cfg = site.ingest
    pacs = replace(cfg.pacs, method=method) if is_method(method) else cfg.pacs
    url_err = dicomweb_url_error(pacs.method, pacs.dicomweb_url)
    if url_err is not None and not from_folder:
        raise ConfigError(site.source, [url_err])
    with typer.progressbar(length=1000, label="ingest") as bar:
        state = {"done": 0}

        def progress(stage: str, done: int, total: int) -> None:
            target = int(1000 * done / max(total, 1))
            bar.label = f"{stage:8s}"
            bar.update(max(0, target - state["done"]))
            state["done"] = max(state["done"], target)

        if from_folder:
            summary = import_folder(from_folder, cfg.cache_dir, progress=progress,
                                    max_instance_mb=cfg.pacs.max_instance_mb,
                                    label_classes=cfg.cohort.label_classes)
        else:
            summary = ingest(pacs, cfg.cohort, cfg.cache_dir, progress=progress)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"cache {cfg.cache_dir}")
    if summary.exit_code != ExitCode.OK:  # PACS, CONFIG (empty cohort) or DATA
        raise typer.Exit(int(summary.exit_code))


@site_cli.command("start")
def site_start(
    superlink: Annotated[str, typer.Option(help="SuperLink Fleet address host:port")],
    root_certificates: Annotated[Path, typer.Option(help="federation CA (ca.pem)")],
    auth_key: Annotated[Path, typer.Option(help="this site's private key (NAME.key)")],
    config: Annotated[Path | None, typer.Option(
        help="site TOML (default: $FEDPACS_SITE_CONFIG)")] = None,
    runtime_port: Annotated[int, typer.Option(help="local SuperNode runtime port")] = 9094,
    metrics_port: Annotated[int, typer.Option(
        help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")] = 0,
    state_dir: Annotated[Path | None, typer.Option(help="site state folder (metrics)")] = None,
    max_wait: Annotated[float | None, typer.Option(
        help="give up connecting to the SuperLink after this many seconds")] = None,
) -> None:
    """Validate the site config, then run this hospital's SuperNode (the site daemon)."""
    from fedpacs.client.daemon import DaemonOptions, run_daemon

    code = run_daemon(DaemonOptions(config=config, superlink=superlink,
                                    root_certificates=root_certificates, auth_key=auth_key,
                                    runtime_port=runtime_port, metrics_port=metrics_port,
                                    state_dir=state_dir, max_wait_s=max_wait))
    raise typer.Exit(code)

