"""Commands of privacy/: audit-log verification and consortium / site provisioning."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Hash-chained audit logs of the server and the sites.", no_args_is_help=True)
    audit.command("verify")(verify)
    app.add_typer(audit, name="audit")
    consortium = typer.Typer(help="The operator's keys and certificates.", no_args_is_help=True)
    consortium.command("init")(consortium_init)
    consortium.command("add-site")(add_site)
    consortium.command("list-sites")(list_sites)
    consortium.command("remove-site")(remove_site)
    app.add_typer(consortium, name="consortium")
    site = typer.Typer(help="A hospital site's keys, trust anchors and settings.", no_args_is_help=True)
    site.command("init")(site_init)
    app.add_typer(site, name="site")


def verify(log: Path = typer.Argument(..., help="an audit.jsonl (its .head file beside it)")) -> None:
    """Report every edited, inserted, removed or reordered entry; exit 1 if there is any."""
    from privacy.audit import verify as verify_log

    report = verify_log(log)
    typer.echo(report.format())
    raise typer.Exit(code=0 if report.ok else 1)


def consortium_init(
    directory: Path = typer.Argument(..., help="an empty directory for the consortium's keys"),
    name: str = typer.Option(..., "--name", help="the consortium's name"),
    address: str = typer.Option(..., "--address", help="HOST:PORT at which sites reach the SuperLink"),
) -> None:
    """Create the CA, the server's TLS key and certificate, and the model-signing key pair."""
    from privacy.pki import ProvisioningError, init_consortium

    try:
        record = init_consortium(directory, name, address)
    except ProvisioningError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(f"consortium {name!r} in {directory}: CA valid until {record['ca_not_after'][:10]}, server "
               f"certificate for {', '.join(record['server_sans'])} until {record['server_not_after'][:10]}")
    typer.echo(f"send {directory / 'public'} to every site; confirm out of band the CA fingerprint "
               f"{record['ca_sha256'][:16]}... and the signing key fingerprint {record['signing_pub_sha256'][:16]}...")


def site_init(
    directory: Path = typer.Argument(..., help="an empty directory for the site's keys and settings"),
    name: str = typer.Option(..., "--name", help="the site's name"),
    consortium: Path = typer.Option(..., "--consortium", help="the public/ directory received from the operator"),
    data: str = typer.Option("", "--data", help="the site directory of tables (see `oncofed validate`)"),
    budget: float = typer.Option(8.0, "--budget", help="the site's privacy budget (epsilon) over all runs"),
    min_count: int = typer.Option(5, "--min-count", min=1, help="counts below this are never reported"),
) -> None:
    """Create the site's node-authentication key (ECDSA P-384, OpenSSH) and settings."""
    from privacy.pki import ProvisioningError, init_site

    try:
        settings = init_site(directory, name, consortium, data, budget, min_count)
    except ProvisioningError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(f"site {name!r} in {directory} for consortium {settings['consortium']!r} at {settings['superlink']}")
    typer.echo(f"send {directory / 'keys' / 'site.key.pub'} to the operator to register (fingerprint "
               f"{settings['public-key-sha256'][:16]}...); the private key never leaves this machine")


def _registry(action):
    from privacy.pki import ProvisioningError

    try:
        return action()
    except ProvisioningError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)


def add_site(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Option(..., "--name", help="the site's name"),
    key: Path = typer.Option(..., "--key", help="the site's site.key.pub"),
) -> None:
    """Register a site's public key with the SuperLink (Flower node authentication)."""
    from privacy import registry

    site = _registry(lambda: registry.add_site(directory, name, key))
    typer.echo(f"site {name!r} registered as node {site['node_id']} (key {site['key_sha256'][:16]}...)")


def list_sites(directory: Path = typer.Argument(..., help="the consortium directory")) -> None:
    """The registered sites and the SuperLink's status of each."""
    from privacy import registry

    for s in _registry(lambda: registry.list_sites(directory)):
        typer.echo(f"{s['name']:<20} node {s['node_id']:<22} {s['status']:<12} key {s['key_sha256'][:16]}...")


def remove_site(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Option(..., "--name", help="the site's name"),
) -> None:
    """Unregister a site: its SuperNode can no longer connect."""
    from privacy import registry

    site = _registry(lambda: registry.remove_site(directory, name))
    typer.echo(f"site {name!r} (node {site['node_id']}) removed")
