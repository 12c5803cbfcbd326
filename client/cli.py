"""Hospital-site commands: `oncofed validate`, `oncofed site init`, `oncofed site start`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    site = typer.Typer(help="A hospital site's keys, trust anchors, settings and SuperNode.", no_args_is_help=True)
    site.command("init")(site_init)
    site.command("start")(site_start)
    app.add_typer(site, name="site")


def validate(
    schema: Path = typer.Option(..., "--schema", help="the consortium's schema JSON"),
    data: Path = typer.Option(..., "--data", help="the site directory: labels.csv and one table per modality"),
    min_count: int = typer.Option(5, "--min-count", min=1,
                                  help="smallest class size the site may train on and report"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (for programs)"),
) -> None:
    """Check a site's data against the schema: every problem at once, or a summary.

    Exit code 0: ready to train (warnings allowed); 1: data problems; 2: the schema file is unusable.
    """
    from shared_models.schema import FeatureSchema, SchemaError
    from shared_models.validation import validate_site

    try:
        feature_schema = FeatureSchema.load(schema)
    except (SchemaError, UnicodeDecodeError) as e:  # load lets a non-UTF-8 file through as UnicodeDecodeError
        message = str(e) if isinstance(e, SchemaError) else f"{schema}: not a text (UTF-8) JSON file"
        typer.echo(f"{message}\nfix: pass the consortium's schema JSON file", err=True)
        raise typer.Exit(code=2)
    report = validate_site(feature_schema, data, min_count=min_count)
    typer.echo(report.to_json() if as_json else report.format_report())
    raise typer.Exit(code=0 if report.ok else 1)


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


def site_start(
    directory: Path = typer.Argument(..., help="the site directory written by `oncofed site init`"),
    schema: Path = typer.Option(None, "--schema", help="the consortium's schema: the data is validated before "
                                "connecting"),
    port: int = typer.Option(9094, "--port", help="the SuperNode's local runtime port (127.0.0.1)"),
    superlink: str = typer.Option("", "--superlink", help="override site.json's server address HOST:PORT"),
    poll_interval: float = typer.Option(0.5, "--poll-interval", min=0.1, max=3.0,
                                        help="seconds between the SuperNode's pulls when idle (Flower: 3)"),
) -> None:
    """Preflight (CA, key, data, server reachable), then the site's SuperNode, in the foreground.

    Exit 2: a preflight check failed (listed). Exit 3: the server refused to activate the site (its key is not registered).
    """
    from client.supernode import SiteConfigError, load_site, run_supernode, site_checks
    from privacy.preflight import PreflightError, report

    try:
        settings = load_site(directory)
        typer.echo(report(f"site {settings['site-name']!r}",
                          site_checks(settings, port, schema, superlink or None)))
    except (SiteConfigError, PreflightError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=run_supernode(settings, port, poll_interval, superlink or None))
