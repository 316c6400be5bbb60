"""The ``fedpacs`` command line (Typer). Each command parses, validates and calls one
library function; errors print what is wrong and exit with a code from the registry."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer

from fedpacs.common.errors import EXIT_CODES, ConfigError, ExitCode, FedpacsError, FieldError

if TYPE_CHECKING:
    from fedpacs.common.registry_api import RegistryClient

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="fedpacs: federated training across hospitals' PACS.")
site_cli = typer.Typer(no_args_is_help=True, help="Hospital side: check a site, run its daemon.")
provision_cli = typer.Typer(no_args_is_help=True, help="CA, SuperLink TLS and site keys.")
registry_cli = typer.Typer(no_args_is_help=True, help="Coordinator: serve the model registry.")
models_cli = typer.Typer(no_args_is_help=True, help="Researcher: list, show and pull models.")
cli.add_typer(site_cli, name="site")
cli.add_typer(provision_cli, name="provision")
federation_cli = typer.Typer(no_args_is_help=True,
                             help="Coordinator: bring a local federation up or down.")
run_cli = typer.Typer(no_args_is_help=True, help="Coordinator: start, watch and stop runs.")
cli.add_typer(registry_cli, name="registry")
cli.add_typer(federation_cli, name="federation")
cli.add_typer(run_cli, name="run")
cli.add_typer(models_cli, name="models")


@cli.command()
def demo(
    task: Annotated[str, typer.Option(help="hippocampus | breastmnist | pneumoniamnist | "
                                           "adrenalmnist3d")] = "hippocampus",
    sites: Annotated[int, typer.Option(help="number of SuperNodes (hospitals)")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 5,
    local_epochs: Annotated[int, typer.Option(help="local epochs per round (0: task default)")] = 0,
    workdir: Annotated[Path, typer.Option(help="where PKI, logs, state and the run go")] = Path(
        "runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(
        help="shared data folder (default: $FEDPACS_DATA_DIR, then ../shared/data)")] = None,
    timeout: Annotated[float, typer.Option(help="deadline for the whole run, seconds")] = 1800.0,
    classification: Annotated[bool, typer.Option(
        "--classification", help="run the MedMNIST (BreastMNIST) classification task")] = False,
    secagg: Annotated[bool, typer.Option(
        help="secure aggregation (SecAgg+): the server sees only the sum of the updates")
                      ] = True,
    dp_clip: Annotated[float, typer.Option(
        help="local differential privacy: clip each update to this L2 norm and add noise "
             "(0: off)")] = 0.0,
) -> None:
    """Run a whole federation on loopback (TLS, authenticated SuperNodes, signed app,
    SecAgg+) with real data."""
    from fedpacs.deploy.demo import DemoOptions, run_demo

    run_demo(DemoOptions(task="breastmnist" if classification else task, sites=sites,
                         rounds=rounds, local_epochs=local_epochs, workdir=workdir,
                         data_dir=data_dir, timeout_s=timeout, secagg=secagg, dp_clip=dp_clip),
             echo=typer.echo)


@provision_cli.command("init")
def provision_init(
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
    site: Annotated[list[str] | None, typer.Option(help="site name (repeat)")] = None,
    host: Annotated[list[str] | None, typer.Option(
        help="extra SuperLink host name/IP for the TLS certificate (repeat)")] = None,
    force: Annotated[bool, typer.Option(help="replace existing keys and certificates")] = False,
) -> None:
    """Create the CA, the SuperLink's TLS certificate and one key pair per site."""
    from fedpacs.deploy.pki import provision

    pki = provision(out, sites=site or [], hosts=host or [], force=force)
    typer.echo(f"CA {pki.ca_cert}\nSuperLink TLS {pki.server_cert} / {pki.server_key}")
    for name in pki.site_names():
        keys = pki.site(name)
        typer.echo(f"site {name}: private {keys.private_key} (give to the site only), "
                   f"public {keys.public_key} (register at the SuperLink)")


@provision_cli.command("signing-key")
def provision_signing_key(
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Create the coordinator's Ed25519 key that signs global-model artifacts."""
    from fedpacs.common.signing import generate_signing_key

    pub = generate_signing_key(out / "signing.key")
    typer.echo(f"private {out / 'signing.key'} (server only), public {pub} (give to researchers)")


@provision_cli.command("add-site")
def provision_add_site(
    name: Annotated[str, typer.Argument(help="site name, e.g. hospital-d")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Create a key pair for one more site, leaving the others untouched."""
    from fedpacs.deploy.pki import Pki, create_site_key

    keys = create_site_key(Pki(out), name)
    typer.echo(f"site {name}: private {keys.private_key}, public {keys.public_key}")


@provision_cli.command("revoke-site")
def provision_revoke_site(
    name: Annotated[str, typer.Argument(help="site name")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Retire one site's key (kept under revoked/ and logged); others are untouched. On a
    running federation use `fedpacs federation revoke`, which also unregisters the node."""
    from fedpacs.deploy.pki import Pki, revoke_site_key

    typer.echo(f"site {name}: key revoked, moved to {revoke_site_key(Pki(out), name)}")


@provision_cli.command("rotate-site")
def provision_rotate_site(
    name: Annotated[str, typer.Argument(help="site name")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Revoke one site's key and issue it a new one; others are untouched."""
    from fedpacs.deploy.pki import Pki, rotate_site_key

    keys = rotate_site_key(Pki(out), name)
    typer.echo(f"site {name}: new private {keys.private_key}, public {keys.public_key} "
               "(register the public key at the SuperLink)")


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
    from fedpacs.client.ingest import import_folder, ingest
    from fedpacs.common.config import load_site_config

    site = load_site_config(config)
    if site.ingest is None:
        raise ConfigError(site.source, [FieldError(
            "[pacs]", "a [pacs] table", "nothing",
            'add [pacs] with method, host, port, called_ae, calling_ae (and [cohort])')])
    cfg = site.ingest
    pacs = replace(cfg.pacs, method=method) if method else cfg.pacs
    with typer.progressbar(length=1000, label="ingest") as bar:
        state = {"done": 0}

        def progress(stage: str, done: int, total: int) -> None:
            target = int(1000 * done / max(total, 1))
            bar.label = f"{stage:8s}"
            bar.update(max(0, target - state["done"]))
            state["done"] = max(state["done"], target)

        if from_folder:
            summary = import_folder(from_folder, cfg.cache_dir, progress=progress)
        else:
            summary = ingest(pacs, cfg.cohort, cfg.cache_dir, progress=progress)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"cache {cfg.cache_dir}")
    if any(s.kind == "pacs-unreachable" for s in summary.skipped):
        raise typer.Exit(int(ExitCode.PACS))
    if summary.skipped:
        raise typer.Exit(int(ExitCode.DATA))


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


WorkdirOpt = Annotated[Path, typer.Option(help="the federation's folder")]


@federation_cli.command("up")
def federation_up_cmd(
    workdir: WorkdirOpt = Path("runs/federation"),
    task: Annotated[str, typer.Option(help="preset whose data the sites get")] = "hippocampus",
    sites: Annotated[int, typer.Option(help="number of sites (disjoint partitions)")] = 3,
    data_dir: Annotated[Path | None, typer.Option(help="shared data folder")] = None,
    site_config: Annotated[list[Path] | None, typer.Option(
        help="use these site files instead of generated ones (repeat)")] = None,
    require_secagg: Annotated[bool, typer.Option(
        help="generated sites train only in SecAgg+ runs")] = True,
) -> None:
    """Start a SuperLink (TLS, node auth) and one site daemon per site, in the background."""
    from fedpacs.deploy.demo import DEMO_DATA, resolve_data_dir, site_names, write_site_configs
    from fedpacs.deploy.procs import free_port
    from fedpacs.server.coordinator import federation_up

    if site_config:
        files = {p.stem: p for p in site_config}
    else:
        if task not in DEMO_DATA:
            raise ConfigError("federation up", [FieldError(
                "task", f"one of {', '.join(DEMO_DATA)}", repr(task), "pick a preset")])
        from fedpacs.deploy.pki import provision

        td = DEMO_DATA[task]
        names = site_names(sites)
        pki = provision(workdir.resolve() / "pki", sites=names)
        paths = write_site_configs(workdir.resolve() / "sites", task=task,
                                   data=resolve_data_dir(data_dir) / td.relpath, fmt=td.format,
                                   names=names, threads=1, seed=0,
                                   trusted_keys=[pki.signing_pub], require_secagg=require_secagg)
        files = dict(zip(names, paths, strict=True))
    state = federation_up(workdir, files, metrics_ports={n: free_port() for n in files})
    typer.echo(f"SuperLink 127.0.0.1:{state.port} (pid {state.superlink_pid}), server metrics "
               f"{state.metrics['server']}")
    for name, pid in state.site_pids.items():
        typer.echo(f"site {name}: daemon pid {pid}, metrics {state.metrics.get(name, '-')}")


@federation_cli.command("revoke")
def federation_revoke_cmd(name: Annotated[str, typer.Argument(help="site name")],
                          workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Revoke one site: unregister its key at the SuperLink, stop its daemon, retire the key."""
    from fedpacs.server.coordinator import revoke_site

    typer.echo(f"site {name}: node {revoke_site(workdir, name)} unregistered, key revoked")


@federation_cli.command("rotate")
def federation_rotate_cmd(name: Annotated[str, typer.Argument(help="site name")],
                          workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Give one site a new key: revoke the old, register the new, restart its daemon."""
    from fedpacs.server.coordinator import rotate_site

    typer.echo(f"site {name}: new key registered, daemon pid {rotate_site(workdir, name)}")


@federation_cli.command("down")
def federation_down_cmd(workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Stop the federation's processes by PID."""
    from fedpacs.server.coordinator import federation_down

    typer.echo(f"stopped pids {federation_down(workdir)}")


@run_cli.command("start")
def run_start(
    workdir: WorkdirOpt = Path("runs/federation"),
    task: Annotated[str, typer.Option(help="task preset")] = "hippocampus",
    network: Annotated[str, typer.Option(help="network (default: the preset's)")] = "",
    strategy: Annotated[str, typer.Option(
        help="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg | krum")] = "fedavg",
    rounds: Annotated[int, typer.Option()] = 3,
    min_sites: Annotated[int, typer.Option(help="sites needed per round")] = 3,
    round_timeout: Annotated[float, typer.Option(help="seconds to wait for sites per round")
                             ] = 900.0,
    local_epochs: Annotated[int, typer.Option()] = 1,
    lr: Annotated[float | None, typer.Option(help="local learning rate")] = None,
    proximal_mu: Annotated[float, typer.Option(help="FedProx mu")] = 0.0,
    fedbn: Annotated[bool, typer.Option(help="keep normalisation layers local")] = False,
    heldout: Annotated[bool, typer.Option(
        help="evaluate on the preset's held-out split at the server")] = True,
    data_dir: Annotated[Path | None, typer.Option(help="shared data folder")] = None,
    task_file: Annotated[Path | None, typer.Option(
        help="a custom task (TOML with the TaskConfig fields) instead of a preset")] = None,
    secagg: Annotated[bool, typer.Option(
        help="SecAgg+: the server sees only the sum of the updates (fedavg/fedprox)")] = True,
    secagg_clip: Annotated[float, typer.Option(
        help="SecAgg+ clipping range of weight * num_examples / max-weight")] = 8.0,
    secagg_max_weight: Annotated[float, typer.Option(
        help="SecAgg+: the largest number of examples one site may report")] = 10000.0,
    max_update_norm: Annotated[float, typer.Option(
        help="drop an update (or aggregate) further than this L2 distance from the global "
             "model (0: off)")] = 0.0,
    dp_clip: Annotated[float, typer.Option(
        help="local DP: clip each site's update to this L2 norm and add noise (0: off)")] = 0.0,
    dp_epsilon: Annotated[float, typer.Option(help="local DP epsilon")] = 1.0,
    dp_delta: Annotated[float, typer.Option(help="local DP delta")] = 1e-5,
) -> None:
    """Validate a run against the federation, then start it; prints the run id."""
    from fedpacs.common.config import RunConfig
    from fedpacs.deploy.demo import DEMO_DATA, resolve_data_dir
    from fedpacs.server.coordinator import start_run

    td = DEMO_DATA.get(task)
    eval_fmt, eval_root = "", ""
    if heldout and td is not None:
        eval_fmt, eval_root = td.format, str(resolve_data_dir(data_dir) / td.relpath)
    task_json = ""
    if task_file is not None:
        import json

        from fedpacs.common.config import read_toml
        from fedpacs.common.tasks import TaskConfig

        custom = TaskConfig.from_dict(read_toml(task_file), source=str(task_file))
        task, task_json = custom.name, json.dumps(custom.to_dict())
        td = None
    cfg = RunConfig(task=task, task_json=task_json, network=network, strategy=strategy,
                    rounds=rounds,
                    min_sites=min_sites, round_timeout_s=round_timeout,
                    local_epochs=local_epochs, lr=lr if lr is not None else (td.lr if td else 1e-3),
                    batch_size=td.batch_size if td else 8, proximal_mu=proximal_mu, fedbn=fedbn,
                    eval_format=eval_fmt, eval_root=eval_root, secagg=secagg,
                    secagg_clip=secagg_clip, secagg_max_weight=secagg_max_weight,
                    max_update_norm=max_update_norm, dp_clip=dp_clip, dp_epsilon=dp_epsilon,
                    dp_delta=dp_delta)
    run_id, run_dir = start_run(workdir, cfg)
    typer.echo(f"run {run_id} started; run directory {run_dir}")


@run_cli.command("status")
def run_status_cmd(run_id: Annotated[int, typer.Argument()],
                   workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Status, round progress and latest metrics of a run (JSON)."""
    import json

    from fedpacs.server.coordinator import run_status

    typer.echo(json.dumps(run_status(workdir, run_id), indent=2, default=str))


@run_cli.command("stop")
def run_stop_cmd(run_id: Annotated[int, typer.Argument()],
                 workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Stop a run."""
    from fedpacs.server.coordinator import stop_run

    stop_run(workdir, run_id)
    typer.echo(f"run {run_id} stopped")


@run_cli.command("report")
def run_report_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """(Re)write a run's report: PNG plots per round, per site, cross-site, and HTML."""
    from fedpacs.server.report import write_report

    typer.echo(str(write_report(run_dir)))


@run_cli.command("logs")
def run_logs_cmd(run_id: Annotated[int, typer.Argument()],
                 workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Print the run's logs (ServerApp side)."""
    from fedpacs.server.coordinator import run_logs

    typer.echo(run_logs(workdir, run_id))


@registry_cli.command("add-token")
def registry_add_token(
    researcher: Annotated[str, typer.Argument(help="researcher name, e.g. alice@uni")],
    tokens: Annotated[Path, typer.Option(help="token file (hashes only)")] = Path(
        "registry/tokens.json"),
) -> None:
    """Create a researcher's bearer token (printed once; only its hash is stored)."""
    from fedpacs.server.registry import TokenStore

    typer.echo(TokenStore(tokens).add(researcher))


@registry_cli.command("publish")
def registry_publish(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    model_id: Annotated[str, typer.Option("--id", help="model id in the registry")],
    root: Annotated[Path, typer.Option(help="registry folder")] = Path("registry/models"),
) -> None:
    """Add a finished run (final model + card) to the registry."""
    from fedpacs.server.registry import Registry

    if not (run_dir / "final" / "model_card.json").is_file():
        raise ConfigError(str(run_dir), [FieldError(
            "run_dir", "a finished run (final/model_card.json)", str(run_dir),
            "wait for the run to finish or pick its run directory")])
    typer.echo(str(Registry(root).publish(run_dir, model_id)))


@registry_cli.command("serve")
def registry_serve(
    root: Annotated[Path, typer.Option(help="registry folder")] = Path("registry/models"),
    tokens: Annotated[Path, typer.Option(help="token file")] = Path("registry/tokens.json"),
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8470,
) -> None:
    """Serve the registry's HTTP API (bearer tokens) until interrupted."""
    import time

    from fedpacs.server.registry import Registry, RegistryServer, TokenStore

    with RegistryServer(Registry(root), TokenStore(tokens), host=host, port=port) as srv:
        typer.echo(f"registry on {srv.url}/v1/models ({len(srv.registry.model_ids())} models)")
        while True:
            time.sleep(3600)


def _client(url: str | None, token: str | None) -> RegistryClient:
    import os

    from fedpacs.common.registry_api import (
        REGISTRY_TOKEN_ENV,
        REGISTRY_URL_ENV,
        RegistryClient,
    )

    url = url or os.environ.get(REGISTRY_URL_ENV, "")
    token = token or os.environ.get(REGISTRY_TOKEN_ENV, "")
    errs = []
    if not url:
        errs.append(FieldError("url", "the registry URL", "nothing",
                               f"pass --url or set ${REGISTRY_URL_ENV}"))
    if not token:
        errs.append(FieldError("token", "your registry token", "nothing",
                               f"pass --token or set ${REGISTRY_TOKEN_ENV}"))
    if errs:
        raise ConfigError("models", errs)
    return RegistryClient(url, token)


UrlOpt = Annotated[str | None, typer.Option(help="registry URL ($FEDPACS_REGISTRY_URL)")]
TokenOpt = Annotated[str | None, typer.Option(help="bearer token ($FEDPACS_TOKEN)")]


@models_cli.command("verify")
def models_verify(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (or a pulled copy of one)")],
    public_key: Annotated[Path, typer.Option(help="the coordinator's signing.pub")],
) -> None:
    """Check a run's signed manifest: the signature and every artifact's SHA-256."""
    from fedpacs.common.signing import verify_run

    result = verify_run(run_dir, public_key)
    for problem in result.problems:
        typer.echo(f"FAIL {problem}", err=True)
    if not result.ok:
        raise typer.Exit(int(ExitCode.AUTH))
    typer.echo(f"OK: signature valid, {result.checked} artifacts match the signed manifest")


@models_cli.command("list")
def models_list(url: UrlOpt = None, token: TokenOpt = None) -> None:
    """List the registry's models with task, network, rounds and held-out metrics."""
    client = _client(url, token)
    for m in client.list():
        held = m.get("heldout") or {}
        key = "dice-mean" if "dice-mean" in held else "accuracy"
        value = held.get(key)
        typer.echo(f"{m['id']:30s} {m.get('task')!s:15s} {m.get('network')!s:12s} "
                   f"rounds {m.get('rounds')}  {key} "
                   f"{'-' if value is None else format(value, '.3f')}")


@models_cli.command("show")
def models_show(model_id: Annotated[str, typer.Argument()], url: UrlOpt = None,
                token: TokenOpt = None) -> None:
    """Print a model's card (JSON)."""
    import json

    client = _client(url, token)
    typer.echo(json.dumps(client.show(model_id), indent=2))


@models_cli.command("pull")
def models_pull(
    model_id: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Option(help="download folder")] = Path("models"),
    bundle: Annotated[bool, typer.Option(help="also export a MONAI bundle")] = False,
    url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Download a model (hash-checked against its card); optionally as a MONAI bundle."""
    from fedpacs.common.registry_api import export_bundle

    client = _client(url, token)
    path = client.pull(model_id, out / model_id)
    typer.echo(f"{path}  (load: fedpacs.load_model('{path}'))")
    if bundle:
        typer.echo(f"MONAI bundle {export_bundle(path, out / model_id / 'bundle')}")


metrics_cli = typer.Typer(no_args_is_help=True, help="Prometheus exporter for a metrics folder.")
cli.add_typer(metrics_cli, name="metrics")


@metrics_cli.command("serve")
def metrics_serve(
    directory: Annotated[Path, typer.Option("--dir", help="PROMETHEUS_MULTIPROC_DIR to serve")],
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")],
) -> None:
    """Serve the metrics that ServerApp/ClientApp processes wrote to a folder."""
    import time

    from fedpacs.common.telemetry import serve_multiprocess

    serve_multiprocess(directory, port)
    typer.echo(f"metrics of {directory} on http://127.0.0.1:{port}/metrics")
    while True:
        time.sleep(3600)


@cli.command("exit-codes")
def exit_codes() -> None:
    """List every exit code with its meaning."""
    for code, text in EXIT_CODES.items():
        typer.echo(f"{int(code):4d}  {code.name:<12} {text}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning fedpacs errors into messages and exit codes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rv = cli(args=argv, standalone_mode=False)
        if isinstance(rv, int):  # typer.Exit(code) inside a command, in non-standalone mode
            return rv
    except FedpacsError as err:
        typer.echo(f"error: {err}", err=True)
        return int(err.code)
    except typer.Exit as ex:
        return int(ex.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; child processes stopped", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE)
    except click.exceptions.Abort:
        return int(ExitCode.INTERRUPTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry: exits with main()'s code."""
    sys.exit(main())
