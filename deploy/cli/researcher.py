"""`fedpacs models ...`: the researcher's commands (list, show, pull and verify models).
They use only fedpacs.common (the registry client, bundle export, signature checks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedpacs.common.errors import ConfigError, ExitCode, FieldError

if TYPE_CHECKING:
    from fedpacs.common.registry_api import RegistryClient

models_cli = typer.Typer(no_args_is_help=True,
                         help="Researcher: list, show, pull and verify models.")


def _client(url: str | None, token: str | None, ca: Path | None) -> RegistryClient:
    import os

    from fedpacs.common.registry_api import (
        REGISTRY_CA_ENV,
        REGISTRY_TOKEN_ENV,
        REGISTRY_URL_ENV,
        RegistryClient,
    )

    url = url or os.environ.get(REGISTRY_URL_ENV, "")
    token = token or os.environ.get(REGISTRY_TOKEN_ENV, "")
    ca = ca or (Path(os.environ[REGISTRY_CA_ENV]) if os.environ.get(REGISTRY_CA_ENV) else None)
    errs = []
    if not url:
        errs.append(FieldError("url", "the registry URL", "nothing",
                               f"pass --url or set ${REGISTRY_URL_ENV}"))
    if not token:
        errs.append(FieldError("token", "your registry token", "nothing",
                               f"pass --token or set ${REGISTRY_TOKEN_ENV}"))
    if errs:
        raise ConfigError("models", errs)
    return RegistryClient(url, token, ca=ca)


UrlOpt = Annotated[str | None, typer.Option(help="registry URL ($FEDPACS_REGISTRY_URL)")]
TokenOpt = Annotated[str | None, typer.Option(help="bearer token ($FEDPACS_TOKEN)")]
CaOpt = Annotated[Path | None, typer.Option(
    help="CA certificate that issued the registry's TLS certificate ($FEDPACS_REGISTRY_CA; "
         "default: the system's CAs)")]


@models_cli.command("verify")
def models_verify(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (or a pulled copy of one)")],
    public_key: Annotated[Path, typer.Option(help="the coordinator's artifact-signing.pub")],
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
def models_list(url: UrlOpt = None, token: TokenOpt = None, ca: CaOpt = None) -> None:
    """List the registry's models with task, network, rounds and held-out metrics."""
    client = _client(url, token, ca)
    for m in client.list():
        held = m.get("heldout") or {}
        key = "dice-mean" if "dice-mean" in held else "accuracy"
        value = held.get(key)
        typer.echo(f"{m['id']:30s} {m.get('task')!s:15s} {m.get('network')!s:12s} "
                   f"rounds {m.get('rounds')}  {key} "
                   f"{'-' if value is None else format(value, '.3f')}")


@models_cli.command("show")
def models_show(model_id: Annotated[str, typer.Argument()], url: UrlOpt = None,
                token: TokenOpt = None, ca: CaOpt = None) -> None:
    """Print a model's card (JSON, as served; `pull` checks the signed copy)."""
    import json

    client = _client(url, token, ca)
    typer.echo(json.dumps(client.show(model_id), indent=2))


@models_cli.command("pull")
def models_pull(
    model_id: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Option(help="download folder")] = Path("models"),
    bundle: Annotated[bool, typer.Option(help="also export a MONAI bundle")] = False,
    public_key: Annotated[Path | None, typer.Option(
        help="the coordinator's artifact-signing.pub, pinned ($FEDPACS_REGISTRY_KEY): the "
             "run's signed manifest must verify with it")] = None,
    insecure_no_signature: Annotated[bool, typer.Option(
        "--insecure-no-signature", help="pull without a pinned key: the model is checked "
        "only against the card from the same server")] = False,
    url: UrlOpt = None, token: TokenOpt = None, ca: CaOpt = None,
) -> None:
    """Download a model, its card and metrics, each checked against the run's manifest
    signed by the coordinator; optionally as a MONAI bundle."""
    import os

    from fedpacs.common.registry_api import REGISTRY_KEY_ENV, export_bundle

    client = _client(url, token, ca)
    key = public_key or (Path(os.environ[REGISTRY_KEY_ENV])
                         if os.environ.get(REGISTRY_KEY_ENV) else None)
    if key is not None and insecure_no_signature:
        typer.echo("note: a public key is pinned, so the signature is checked "
                   "(--insecure-no-signature ignored)", err=True)
    path = client.pull(model_id, out / model_id, public_key=key,
                       insecure_no_signature=insecure_no_signature)
    typer.echo(f"signature valid ({key}); every pulled file matches the signed manifest"
               if key else "WARNING: not signature-checked (--insecure-no-signature)",
               err=key is None)
    typer.echo(f"{path}  (load: fedpacs.load_model('{path}'))")
    if bundle:
        typer.echo(f"MONAI bundle {export_bundle(path, out / model_id / 'bundle')}")

