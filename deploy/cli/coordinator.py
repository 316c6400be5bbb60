"""The coordinator's commands: `fedpacs provision|federation|run|registry|metrics ...`.
Each parses, validates and calls one library function in fedpacs.server.coordinator (or
fedpacs.server for the registry and reports)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedpacs.common.strategies import SECAGG_STRATEGIES, STRATEGY_TABLE

if TYPE_CHECKING:
    from fedpacs.server.coordinator.pki import SiteKeys

provision_cli = typer.Typer(no_args_is_help=True,
                            help="Coordinator: CA, SuperLink TLS and site keys.")
federation_cli = typer.Typer(no_args_is_help=True,
                             help="Coordinator: bring a federation up or down, revoke or "
                             "rotate a site.")
run_cli = typer.Typer(no_args_is_help=True, help="Coordinator: start, watch and stop runs.")
registry_cli = typer.Typer(no_args_is_help=True, help="Coordinator: serve the model registry.")
metrics_cli = typer.Typer(no_args_is_help=True, help="Prometheus exporter for a metrics folder.")


@provision_cli.command("init")
def provision_init(
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
    site: Annotated[list[str] | None, typer.Option(help="site name (repeat)")] = None,
    host: Annotated[list[str] | None, typer.Option(
        help="extra SuperLink host name/IP for the TLS certificate (repeat)")] = None,
    force: Annotated[bool, typer.Option(help="replace existing keys and certificates")] = False,
) -> None:
    """Create the CA, the SuperLink's TLS certificate and one key pair per site."""
    from fedpacs.server.coordinator.pki import cert_hosts, provision

    pki = provision(out, sites=site or [], hosts=host or [], force=force)
    typer.echo(f"CA {pki.ca_cert}\nSuperLink TLS {pki.server_cert} / {pki.server_key} "
               f"(names {', '.join(cert_hosts(pki.server_cert))})\n"
               f"app signing {pki.app_key} (sites trust {pki.app_pub})\n"
               f"artifact signing {pki.artifact_key} (researchers verify with "
               f"{pki.artifact_pub})")
    for name in pki.site_names():
        _echo_site(pki.site(name))


def _echo_site(keys: SiteKeys) -> None:
    typer.echo(f"site {keys.name}: give {keys.folder}/ to the hospital (its private key "
               f"{keys.private_key.name}, ca.pem, {keys.trusted_app_key.name}: the app key "
               f"for security.trusted_app_keys); register {keys.public_key} at the "
               f"SuperLink (`fedpacs federation register {keys.name}`)")


@provision_cli.command("signing-keys")
def provision_signing_keys(
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Create the coordinator's two Ed25519 keys: one signs the apps sites run, the other
    each run's artifacts (existing keys are kept)."""
    from fedpacs.server.coordinator.pki import Pki, create_signing_keys

    pki = create_signing_keys(Pki(out))
    typer.echo(f"app signing: private {pki.app_key} (where `run start` runs; never on a "
               f"ServerApp), public {pki.app_pub} (give to every site: "
               f"security.trusted_app_keys)")
    typer.echo(f"artifact signing: private {pki.artifact_key} (the SuperLink host), public "
               f"{pki.artifact_pub} (give to researchers)")


@provision_cli.command("add-site")
def provision_add_site(
    name: Annotated[str, typer.Argument(help="site name, e.g. hospital-d")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Create a key pair for one more site, leaving the others untouched."""
    from fedpacs.server.coordinator.pki import Pki, create_site_key

    _echo_site(create_site_key(Pki(out), name))


@provision_cli.command("revoke-site")
def provision_revoke_site(
    name: Annotated[str, typer.Argument(help="site name")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Retire one site's key (kept under revoked/ and logged); others are untouched. When
    this PKI belongs to a running federation (WORKDIR/pki), the SuperLink also forgets the
    node and the site's daemon stops, as with `fedpacs federation revoke`."""
    from fedpacs.common.procs import process_alive
    from fedpacs.server.coordinator.federation import STATE_FILE, Federation
    from fedpacs.server.coordinator.pki import Pki, revoke_site_key

    workdir = out.resolve().parent
    if (workdir / STATE_FILE).is_file():
        fed = Federation.load(workdir)
        if process_alive(fed.state.superlink_pid) and name in fed.node_ids():
            node = fed.revoke(name)
            typer.echo(f"site {name}: node {node} unregistered at the running SuperLink, "
                       "key revoked")
            return
    typer.echo(f"site {name}: key revoked, moved to {revoke_site_key(Pki(out), name)} "
               "(no running federation uses this PKI; a SuperLink elsewhere must "
               "`flwr supernode unregister` its node id)")


@provision_cli.command("registry-cert")
def provision_registry_cert(
    host: Annotated[list[str], typer.Option(help="host name/IP researchers connect to "
                                                 "(repeat)")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """A TLS certificate for the model registry from the federation CA (researchers pin
    ca.pem with `fedpacs models ... --ca`)."""
    from fedpacs.server.coordinator.pki import Pki, issue_tls_cert

    cert, key = issue_tls_cert(Pki(out), name="registry", hosts=host)
    typer.echo(f"registry TLS {cert} / {key}: `fedpacs registry serve --tls-cert {cert} "
               f"--tls-key {key}`; researchers use --ca {Pki(out).ca_cert}")


@provision_cli.command("rotate-site")
def provision_rotate_site(
    name: Annotated[str, typer.Argument(help="site name")],
    out: Annotated[Path, typer.Option("--dir", help="PKI folder")] = Path("pki"),
) -> None:
    """Revoke one site's key and issue it a new one; others are untouched."""
    from fedpacs.server.coordinator.pki import Pki, rotate_site_key

    _echo_site(rotate_site_key(Pki(out), name))


WorkdirOpt = Annotated[Path, typer.Option(help="the federation's folder")]
# `fedpacs run ...`: a federation folder, or a SuperLink by address (no federation.json)
RunWorkdirOpt = Annotated[Path | None, typer.Option(
    "--workdir", help="the federation's folder (default runs/federation); or give the "
                      "SuperLink by address with --control and --ca")]
ControlOpt = Annotated[str | None, typer.Option(
    "--control", help="HOST:PORT of the SuperLink's Control API (on its host: "
                      "127.0.0.1:PORT, the --control-port of `federation up`)")]
CaOpt = Annotated[Path | None, typer.Option(
    "--ca", help="with --control: the CA the SuperLink's TLS certificate is checked "
                 "against (PKI/ca.pem)")]
AppKeyOpt = Annotated[Path | None, typer.Option(
    "--app-key", help="with --control: the app-signing private key (PKI/app-signing.key)")]
ArtifactKeyOpt = Annotated[Path | None, typer.Option(
    "--artifact-key", help="with --control: the key the ServerApp signs the run's results "
                           "with (PKI/artifact-signing.key)")]
RunsDirOpt = Annotated[Path | None, typer.Option(
    "--runs-dir", help="with --control: the runs folder the SuperLink was started with "
                       "(WORKDIR/runs for `federation up`); run.json there names each run")]
STRATEGY_HELP = "; ".join(f"{s.name}: {s.summary}" for s in STRATEGY_TABLE.values()) + \
    " (default fedavg; under SecAgg+ only " + ", ".join(SECAGG_STRATEGIES) + ")"


@federation_cli.command("up")
def federation_up_cmd(
    workdir: WorkdirOpt = Path("runs/federation"),
    fleet_address: Annotated[str | None, typer.Option(
        help="HOST:PORT the sites dial, e.g. 10.77.0.1:9092: the SuperLink's Fleet-only "
             "listener (its TLS certificate must name HOST: `provision init --host`; "
             "default 127.0.0.1 and a free port)")] = None,
    control_port: Annotated[int, typer.Option(
        help="port of the SuperLink's Control and Runtime APIs, on 127.0.0.1 only "
             "(0: a free port)")] = 0,
    task: Annotated[str, typer.Option(help="preset whose shared data the generated sites "
                                           "get")] = "hippocampus",
    sites: Annotated[int, typer.Option(
        help="number of generated sites run on this host (disjoint partitions); 0: the "
             "coordinator's part alone, sites come from other hosts")] = 3,
    data_dir: Annotated[Path | None, typer.Option(help="shared data folder")] = None,
    site_config: Annotated[list[Path] | None, typer.Option(
        help="run these site files (each named by its file stem) instead of generated "
             "ones (repeat)")] = None,
    require_secagg: Annotated[bool, typer.Option(
        help="generated sites train only in SecAgg+ runs")] = True,
    share_local_models: Annotated[bool, typer.Option(
        help="generated sites consent to exchanging local models for cross-site "
             "validation")] = False,
) -> None:
    """Start a SuperLink (TLS, node auth; Control API on 127.0.0.1, Fleet API on the fleet
    address), a metrics exporter and one site daemon per local site, in the background;
    `federation down` stops them."""
    from fedpacs.common.errors import ConfigError, FieldError
    from fedpacs.deploy.demo import demo_sites, site_names, site_specs
    from fedpacs.server.coordinator.federation import Federation, check_fleet_address
    from fedpacs.server.coordinator.pki import provision
    from fedpacs.server.superlink import ListenAddress, parse_address

    errs = [] if sites >= 0 else [FieldError("--sites", ">= 0", str(sites),
                                             "use 0 for sites on other hosts")]
    fleet: ListenAddress | None = None
    if fleet_address is not None:
        try:
            fleet = parse_address(fleet_address, field="--fleet-address")
        except ConfigError as err:
            errs += err.errors
    if fleet is not None:
        errs += check_fleet_address(fleet, control_port)
    if errs:
        raise ConfigError("federation up", errs)
    work = workdir.resolve()
    hosts = [fleet.host] if fleet is not None else []
    if site_config:
        specs = site_specs(site_config)  # each validated before anything starts
        pki = provision(work / "pki", sites=[s.name for s in specs], hosts=hosts)
    elif sites:
        names = site_names(sites)
        pki = provision(work / "pki", sites=names, hosts=hosts)
        specs = demo_sites(work, pki, task=task, data_dir=data_dir, names=names,
                           require_secagg=require_secagg,
                           share_local_model=share_local_models)
    else:
        pki, specs = provision(work / "pki", sites=[], hosts=hosts), []
    fed = Federation.up(work, pki, specs, fleet=fleet, control_port=control_port)
    urls = fed.state.metrics_urls()
    typer.echo(f"SuperLink fleet {fed.address} (sites dial it), control "
               f"{fed.control_address} (pid {fed.state.superlink_pid}), server metrics "
               f"{urls['server']}")
    for name, site in fed.state.sites.items():
        typer.echo(f"site {name}: daemon pid {site.pid}, metrics {urls.get(name, '-')}")
    if not specs:
        typer.echo(f"no local sites: register each hospital's key with `fedpacs federation "
                   f"register NAME --workdir {work}`")


@federation_cli.command("register")
def federation_register_cmd(
    name: Annotated[str, typer.Argument(help="site name, e.g. hospital-a")],
    public_key: Annotated[Path | None, typer.Option(
        help="the site's SuperNode public key (OpenSSH); default: the one `provision` "
             "made, WORKDIR/pki/sites/NAME/NAME.pub")] = None,
    workdir: WorkdirOpt = Path("runs/federation"),
) -> None:
    """Register a site (on any host) at the running SuperLink: its SuperNode may then
    connect to the fleet address."""
    from fedpacs.server.coordinator.federation import Federation

    node = Federation.load(workdir).register_site(name, public_key=public_key)
    typer.echo(f"site {name}: node {node} registered")


@federation_cli.command("restart-superlink")
def federation_restart_superlink_cmd(workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Start a SuperLink that died again, on its existing database (registered sites and
    runs are kept) and the same addresses; then `fedpacs run resume RUN_DIR` continues an
    interrupted run."""
    from fedpacs.server.coordinator.federation import Federation

    fed = Federation.load(workdir)
    proc = fed.restart_superlink()
    typer.echo(f"SuperLink restarted (pid {proc.pid}) on {fed.database}: fleet "
               f"{fed.address}, control {fed.control_address}")


@federation_cli.command("revoke")
def federation_revoke_cmd(name: Annotated[str, typer.Argument(help="site name")],
                          workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Revoke one site: unregister its key at the SuperLink, stop its daemon, retire the key."""
    from fedpacs.server.coordinator.federation import Federation

    node = Federation.load(workdir).revoke(name)
    typer.echo(f"site {name}: node {node} unregistered, key revoked")


@federation_cli.command("rotate")
def federation_rotate_cmd(name: Annotated[str, typer.Argument(help="site name")],
                          workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Give one site a new key: revoke the old, register the new, restart its daemon."""
    from fedpacs.server.coordinator.federation import Federation

    proc = Federation.load(workdir).rotate(name)
    typer.echo(f"site {name}: new key registered, daemon pid {proc.pid}")


@federation_cli.command("down")
def federation_down_cmd(workdir: WorkdirOpt = Path("runs/federation")) -> None:
    """Stop the federation's processes by PID."""
    from fedpacs.server.coordinator.federation import Federation

    typer.echo(f"stopped pids {Federation.load(workdir).down()}")


@run_cli.command("start")
def run_start(
    workdir: RunWorkdirOpt = None,
    control: ControlOpt = None,
    ca: CaOpt = None,
    app_key: AppKeyOpt = None,
    artifact_key: ArtifactKeyOpt = None,
    runs_dir: RunsDirOpt = None,
    config: Annotated[Path | None, typer.Option(
        help="run.toml with [run] [training] [strategy] [evaluation] [secagg] [screening] "
             "[dp] (and [task] for a custom task); flags override it")] = None,
    task: Annotated[str | None, typer.Option(help="task preset")] = None,
    task_file: Annotated[Path | None, typer.Option(
        help="a custom task (TOML with the TaskConfig fields) instead of a preset")] = None,
    network: Annotated[str | None, typer.Option(help="network (default: the task's)")] = None,
    strategy: Annotated[str | None, typer.Option(help=STRATEGY_HELP)] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds (default 5)")] = None,
    min_sites: Annotated[int | None, typer.Option(help="sites needed per round (default 3)")
                         ] = None,
    round_timeout: Annotated[float | None, typer.Option(
        help="seconds to wait for sites per round (default 900)")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="default: the task's")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: the task's")] = None,
    lr: Annotated[float | None, typer.Option(help="local learning rate (default: the "
                                                  "task's)")] = None,
    augment: Annotated[str | None, typer.Option(
        help="training-split augmentation, seeded per site and round: a comma list of "
             "flip, rotate, scale, elastic, intensity, or all (default: none)")] = None,
    loss: Annotated[str | None, typer.Option(
        help="auto | ce | focal | dice | dice-ce | dice-focal (default auto: dice-ce for "
             "segmentation, ce for classification)")] = None,
    class_weights: Annotated[str | None, typer.Option(
        help="none | balanced: inverse class frequency of each site's training split")] = None,
    focal_gamma: Annotated[float | None, typer.Option(help="focal loss gamma (default 2)")
                           ] = None,
    sampler: Annotated[str | None, typer.Option(
        help="shuffle | balanced: every class drawn equally often (classification)")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | sgd (default adam)")
                         ] = None,
    momentum: Annotated[float | None, typer.Option(help="sgd momentum (default 0.9)")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="default 0")] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        help="constant | cosine | step, over the run's rounds (default constant)")] = None,
    warmup_rounds: Annotated[int | None, typer.Option(
        help="rounds of linear learning-rate warm-up (default 0)")] = None,
    grad_clip: Annotated[float | None, typer.Option(
        help="clip each step's gradient to this L2 norm (default 0: off)")] = None,
    freeze: Annotated[str | None, typer.Option(
        help="none | features: train only the network's head (with --init-model)")] = None,
    init_model: Annotated[str | None, typer.Option(
        help="round-0 weights: a registry model id, a MONAI bundle folder or a .pt file "
             "(default: the network's seeded initial weights)")] = None,
    registry: Annotated[Path, typer.Option(
        help="the registry folder an --init-model id is looked up in")] = Path(
            "registry/models"),
    uncertainty: Annotated[str | None, typer.Option(
        help="evaluation: none | mc-dropout | tta, reported next to the metric")] = None,
    uncertainty_samples: Annotated[int | None, typer.Option(
        help="forward passes per case for --uncertainty (default 8)")] = None,
    proximal_mu: Annotated[float | None, typer.Option(help="FedProx mu")] = None,
    fedbn: Annotated[bool | None, typer.Option(
        "--fedbn/--no-fedbn", help="keep normalisation layers local")] = None,
    personalize: Annotated[str | None, typer.Option(
        help="none | finetune: after the last round each site fine-tunes the global model "
             "on its own training split and reports validation before/after")] = None,
    personalize_epochs: Annotated[int | None, typer.Option(
        help="epochs of that fine-tuning (default 1)")] = None,
    cross_site_local: Annotated[bool | None, typer.Option(
        "--cross-site-local/--no-cross-site-local",
        help="plain mode: also send each consenting site's last local model to the other "
             "consenting sites for cross-site validation (default: only the global model)")
                                ] = None,
    eval_root: Annotated[str | None, typer.Option(
        help="held-out data on this host (a MedMNIST .npz or a NIfTI folder) the server "
             "evaluates every round (default: none)")] = None,
    eval_format: Annotated[str | None, typer.Option(
        help="medmnist | nifti | images | image-masks (default: from --eval-root)")] = None,
    secagg: Annotated[bool | None, typer.Option(
        "--secagg/--no-secagg",
        help="SecAgg+: the server sees only the sum of the updates (default on)")] = None,
    secagg_clip: Annotated[float | None, typer.Option(
        help="SecAgg+ clipping range of weight * num_examples / max-weight (default 8)")
                           ] = None,
    secagg_max_weight: Annotated[float | None, typer.Option(
        help="SecAgg+: the largest number of examples one site may report (default 10000)")
                                 ] = None,
    max_update_norm: Annotated[float | None, typer.Option(
        help="drop an update (or aggregate) further than this L2 distance from the global "
             "model (default 0: off)")] = None,
    dp_clip: Annotated[float | None, typer.Option(
        help="local DP: clip each site's update to this L2 norm and add noise (0: off)")
                       ] = None,
    dp_epsilon: Annotated[float | None, typer.Option(help="local DP epsilon")] = None,
    dp_delta: Annotated[float | None, typer.Option(help="local DP delta")] = None,
) -> None:
    """Validate a run against the federation, then start it; prints the run id."""
    from dataclasses import replace

    from fedpacs.common.config import custom_task_fields, load_run_config, read_toml
    from fedpacs.server.coordinator import control as ctl

    target = ctl.resolve_target(
        command="run start", workdir=workdir, control=control, ca=ca, app_key=app_key,
        artifact_key=artifact_key, runs_dir=runs_dir,
        needs=frozenset({ctl.APP_KEY_FLAG, ctl.ARTIFACT_KEY_FLAG, ctl.RUNS_DIR_FLAG}))
    flags = {k: v for k, v in {
        "task": task, "network": network, "strategy": strategy, "rounds": rounds,
        "min_sites": min_sites, "round_timeout_s": round_timeout,
        "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr,
        "augment": augment, "loss": loss, "class_weights": class_weights,
        "focal_gamma": focal_gamma, "sampler": sampler, "optimizer": optimizer,
        "momentum": momentum, "weight_decay": weight_decay, "lr_schedule": lr_schedule,
        "warmup_rounds": warmup_rounds, "grad_clip": grad_clip, "freeze": freeze,
        "init_model": init_model, "uncertainty": uncertainty,
        "uncertainty_samples": uncertainty_samples,
        "proximal_mu": proximal_mu, "fedbn": fedbn, "personalize": personalize,
        "personalize_epochs": personalize_epochs, "cross_site_local": cross_site_local,
        "eval_root": eval_root,
        "eval_format": eval_format, "secagg": secagg, "secagg_clip": secagg_clip,
        "secagg_max_weight": secagg_max_weight, "max_update_norm": max_update_norm,
        "dp_clip": dp_clip, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta,
    }.items() if v is not None}
    if task_file is not None:
        flags |= custom_task_fields(read_toml(task_file), str(task_file))
    if init_model is not None:  # a path for the ServerApp, whatever its working folder
        flags["init_model"] = str(Path(init_model).resolve()) if Path(init_model).exists() \
            else init_model
    cfg = load_run_config(config, flags)
    if cfg.init_model:
        cfg = replace(cfg, init_registry=str(registry.resolve()))
    started = ctl.start(target=target, cfg=cfg)
    typer.echo(f"run {started.run_id} started; run directory {started.run_dir}")


@run_cli.command("status")
def run_status_cmd(run_id: Annotated[int, typer.Argument()],
                   workdir: RunWorkdirOpt = None, control: ControlOpt = None,
                   ca: CaOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Status, round progress and latest metrics of a run (JSON). A status.json left at
    running by a ServerApp that is gone is settled (interrupted or failed, with why)."""
    import json

    from fedpacs.server.coordinator import control as ctl

    target = ctl.resolve_target(command="run status", workdir=workdir, control=control,
                                ca=ca, runs_dir=runs_dir, needs=frozenset({ctl.RUNS_DIR_FLAG}))
    st = ctl.status(target=target, run_id=run_id)
    if st.reconciled:
        typer.echo(f"run {run_id}: {st.state}: {st.error}", err=True)
    typer.echo(json.dumps(st.to_json(), indent=2, default=str))


@run_cli.command("stop")
def run_stop_cmd(run_id: Annotated[int, typer.Argument()],
                 workdir: RunWorkdirOpt = None, control: ControlOpt = None,
                 ca: CaOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Stop a run."""
    from fedpacs.server.coordinator import control as ctl

    target = ctl.resolve_target(command="run stop", workdir=workdir, control=control, ca=ca,
                                runs_dir=runs_dir)
    ctl.stop(target=target, run_id=run_id)
    typer.echo(f"run {run_id} stopped")


@run_cli.command("resume")
def run_resume_cmd(run_dir: Annotated[Path, typer.Argument(
                       help="the run's folder (under the SuperLink's runs folder)")],
                   workdir: RunWorkdirOpt = None, control: ControlOpt = None,
                   ca: CaOpt = None, app_key: AppKeyOpt = None,
                   runs_dir: RunsDirOpt = None) -> None:
    """Continue a stopped run (interrupted, failed, or its SuperLink restarted) after its
    last completed round, as a new Flower run; prints its run id."""
    from fedpacs.server.coordinator import control as ctl

    target = ctl.resolve_target(command="run resume", workdir=workdir, control=control,
                                ca=ca, app_key=app_key, runs_dir=runs_dir,
                                needs=frozenset({ctl.APP_KEY_FLAG}))
    resumed = ctl.resume(target=target, run_dir=run_dir)
    typer.echo(f"run {resumed.run_id} started: resumes {resumed.run_dir} after round "
               f"{resumed.after_round} of {resumed.rounds}")


@run_cli.command("report")
def run_report_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """(Re)write a run's report: PNG plots per round, per site, cross-site, and HTML."""
    from fedpacs.server.report import write_report

    typer.echo(str(write_report(run_dir)))


@run_cli.command("logs")
def run_logs_cmd(run_id: Annotated[int, typer.Argument()],
                 workdir: RunWorkdirOpt = None, control: ControlOpt = None,
                 ca: CaOpt = None, runs_dir: RunsDirOpt = None) -> None:
    """Print the run's logs (ServerApp side)."""
    from fedpacs.server.coordinator import control as ctl

    target = ctl.resolve_target(command="run logs", workdir=workdir, control=control, ca=ca,
                                runs_dir=runs_dir)
    typer.echo(ctl.logs(target=target, run_id=run_id))


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
    allow_unsigned: Annotated[bool, typer.Option(
        "--allow-unsigned", help="publish a run without a signed manifest (development: "
        "researchers then need `models pull --insecure-no-signature`)")] = False,
) -> None:
    """Add a finished, signed run (final model, card, metrics, signed manifest) to the
    registry."""
    from fedpacs.server.registry import Registry

    typer.echo(str(Registry(root).publish(run_dir, model_id, allow_unsigned=allow_unsigned)))


@registry_cli.command("serve")
def registry_serve(
    root: Annotated[Path, typer.Option(help="registry folder")] = Path("registry/models"),
    tokens: Annotated[Path, typer.Option(help="token file")] = Path("registry/tokens.json"),
    host: Annotated[str, typer.Option(
        help="bind address (beyond loopback only with --tls-cert/--tls-key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8470,
    tls_cert: Annotated[Path | None, typer.Option(
        help="TLS certificate (PEM) researchers verify with --ca")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    timeout: Annotated[float, typer.Option(
        help="seconds a connection has for the TLS handshake and its request, and each "
             "write to progress")] = 30.0,
) -> None:
    """Serve the registry's HTTPS API (bearer tokens) until interrupted; plain HTTP only on
    a loopback address."""
    import time

    from fedpacs.common.errors import ConfigError, FieldError
    from fedpacs.server.registry import (
        Registry,
        RegistryServer,
        ServeLimits,
        TlsFiles,
        TokenStore,
    )

    if (tls_cert is None) != (tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if tls_key is None \
            else ("--tls-key", "--tls-cert")
        raise ConfigError("registry serve", [FieldError(
            missing, f"a PEM file, given together with {given}", "nothing",
            "pass both --tls-cert FILE and --tls-key FILE")])
    tls = TlsFiles(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    with RegistryServer(Registry(root), TokenStore(tokens), host=host, port=port, tls=tls,
                        limits=ServeLimits(timeout_s=timeout)) as srv:
        typer.echo(f"registry on {srv.url}/v1/models ({len(srv.registry.model_ids())} models)")
        while True:
            time.sleep(3600)


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

