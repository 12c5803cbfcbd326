"""The operator's commands: `oncofed consortium ...` (keys, proxy, sites), `oncofed server start`, `oncofed run`."""

from __future__ import annotations

from pathlib import Path

import typer

from shared_models.flower_tools import METRICS_PORT, SUPERLINK_INTERNAL_PORT


def register(app: typer.Typer) -> None:
    consortium = typer.Typer(help="The operator's keys, certificates, proxy and registered sites.",
                             no_args_is_help=True)
    consortium.command("init")(consortium_init)
    consortium.command("add-site")(add_site)
    consortium.command("list-sites")(list_sites)
    consortium.command("remove-site")(remove_site)
    app.add_typer(consortium, name="consortium")
    server = typer.Typer(help="The consortium's server (SuperLink behind its TLS proxy).", no_args_is_help=True)
    server.command("start")(server_start)
    server.command("stop")(server_stop)
    server.command("preflight")(server_preflight)
    app.add_typer(server, name="server")
    app.command("run")(run)
    app.command("deliver")(deliver)
    runs = typer.Typer(help="Training runs on the consortium's server: list, follow, stop.", no_args_is_help=True)
    runs.command("list")(runs_list)
    runs.command("follow")(runs_follow)
    runs.command("stop")(runs_stop)
    app.add_typer(runs, name="runs")


def consortium_init(
    directory: Path = typer.Argument(..., help="an empty directory for the consortium's keys"),
    name: str = typer.Option(..., "--name", help="the consortium's name"),
    address: str = typer.Option(..., "--address", help="HOST:PORT at which sites reach the server (the TLS proxy)"),
    internal_port: int = typer.Option(SUPERLINK_INTERNAL_PORT, "--internal-port",
                                      help="the SuperLink's own port, on 127.0.0.1 only (never exposed)"),
    schema: Path = typer.Option(None, "--schema", help="the consortium's feature schema, sent to every site in "
                                "public/ (default: the project's, `schema` in tool.flwr.app.config)"),
) -> None:
    """Create the CA, the server's TLS key and certificate, the model-signing key pair and the proxy config."""
    from privacy.pki import ProvisioningError, init_consortium, parse_address
    from server.deploy import superlink_port_refusal
    from server.proxy import write_config

    if refusal := superlink_port_refusal(internal_port):  # another consortium's server on this machine has it
        typer.echo(refusal, err=True)
        raise typer.Exit(code=2)
    try:
        record = init_consortium(directory, name, address, internal_port=internal_port, schema=schema)
    except ProvisioningError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    host, port = parse_address(record["address"])
    conf = write_config(directory, host, port, internal_port)
    typer.echo(f"consortium {name!r} in {directory}: CA valid until {record['ca_not_after'][:10]}, server "
               f"certificate for {', '.join(record['server_sans'])} until {record['server_not_after'][:10]}")
    typer.echo(f"proxy configuration {conf}: sites reach only the Fleet API at {record['address']}")
    typer.echo(f"send {directory / 'public'} to every site, and read each hospital the CA fingerprint by phone or "
               f"another channel (their `oncofed site init --ca-fingerprint` refuses any other bundle):\n"
               f"  CA fingerprint (SHA-256)          {record['ca_sha256']}\n"
               f"  model-signing key (SHA-256)       {record['signing_pub_sha256']}\n"
               f"  schema file (SHA-256)             {record['schema_sha256']}")


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
    typer.echo(f"site {name!r} registered as node {site['node_id']}; key fingerprint {site['key_sha256']} (compare "
               "it with the one the hospital read out)")


def list_sites(directory: Path = typer.Argument(..., help="the consortium directory")) -> None:
    """The registered sites and the SuperLink's status of each (with the server down: the register, status unknown)."""
    from privacy import registry
    from privacy.pki import ProvisioningError

    try:
        sites, unreachable = registry.list_sites(directory), ""
    except ProvisioningError as e:  # the register is this directory's own file: listed all the same
        sites, unreachable = _registry(lambda: registry.register_only(directory)), str(e)
        if "Connection to the SuperLink is unavailable" in unreachable:  # flwr's words for "not listening": said below
            unreachable = "not answering"
    for s in sites:
        typer.echo(f"{s['name']:<20} node {s.get('node_id', '-'):<22} {s['status']:<12} key {s['key_sha256']}")
    if unreachable:
        typer.echo(f"the SuperLink was not reachable, so whether each site is online is unknown (status "
                   f"{registry.UNKNOWN_STATUS!r}); the list is the register in {directory / 'consortium.json'}. "
                   f"Start the server (`oncofed server start {directory}`) to see who is online (the SuperLink: {unreachable})",
                   err=True)


def remove_site(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Option(..., "--name", help="the site's name"),
) -> None:
    """Unregister a site: its SuperNode can no longer connect."""
    from privacy import registry

    site = _registry(lambda: registry.remove_site(directory, name))
    typer.echo(f"site {name!r} (node {site['node_id']}) removed")


def server_preflight(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    metrics_port: int = typer.Option(METRICS_PORT, "--metrics-port", help="the Prometheus port `server start` will use "
                                     "(0: off)"),
) -> None:
    """Run the server's preflight checks only (certificates, keys, ports, nginx)."""
    from privacy.preflight import PreflightError, report
    from server.deploy import Consortium, DeployError, server_checks

    try:
        c = Consortium.load(directory)
        typer.echo(report(f"server {c.record['name']!r}", server_checks(c, metrics_port)))
    except (DeployError, PreflightError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)


def server_start(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    metrics_port: int = typer.Option(METRICS_PORT, "--metrics-port", help="Prometheus /metrics on 127.0.0.1 (0: off)"),
) -> None:
    """Preflight, then the SuperLink (TLS, node authentication, database) on loopback behind the TLS proxy.

    Stays in the foreground; stop with Ctrl-C, SIGTERM or `oncofed server stop`. Exit 2: a preflight check failed
    (listed).
    """
    import sys

    from privacy.preflight import PreflightError
    from server.deploy import DeployError, start_server

    try:
        code = start_server(directory, metrics_port=metrics_port, out=sys.stdout)
    except (DeployError, PreflightError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=code)


def server_stop(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait for it to end"),
    force: bool = typer.Option(False, "--force", help="stop it even while a run trains (the run stops too)"),
) -> None:
    """Stop this consortium's `oncofed server start` (and its SuperLink, SuperExec and proxy), as Ctrl-C does.

    A run in progress stops with it, and so does a running `oncofed deliver`, so it is refused while one does unless
    --force; once the server is back `oncofed run --resume` continues the run, `oncofed deliver` sends the model
    again. A run or delivery still pending is not ended (the restarted server starts it): named, not refused for.
    Exit 1: it could not be stopped, or a run trains or a delivery runs (named, with the fix).
    """
    from server.deploy import DeployError, stop_server

    try:
        typer.echo(stop_server(directory, timeout, force))
    except DeployError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=1)


def run(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Option("run", "--name", help="the run's directory under CONSORTIUM/runs/"),
    overrides: list[str] = typer.Option([], "--set", help="a run-config KEY=VALUE (repeatable), e.g. --set "
                                        "num-rounds=10 (keys: tool.flwr.app.config in pyproject.toml)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run NAME from its latest checkpoint"),
    timeout: float = typer.Option(0.0, "--timeout", help="give up after this many seconds (0: never)"),
) -> None:
    """Preflight, then submit a training run to the consortium's SuperLink and follow it to the end.

    Exit 0: trained and installed at every site that trained; 1: did not finish; 2: preflight failed (listed);
    3: trained, but some site that trained did not install the model (send it again: `oncofed deliver`).
    """
    import sys

    from privacy.preflight import PreflightError
    from privacy.run_config import parse_run_overrides
    from server.deploy import DeployError
    from server.submit import submit_run
    from shared_models.run_config import RunConfigError

    try:
        code = submit_run(directory, name, parse_run_overrides(overrides, source="--set"),
                          resume=resume,
                          timeout=timeout, out=sys.stdout)
    except (DeployError, PreflightError, RunConfigError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    except KeyboardInterrupt:  # the run lives on the SuperLink: only following it stopped
        typer.echo(f"\nstopped following run {name!r}; if it was submitted it goes on training on the server "
                   f"(`oncofed runs list {directory}`): `oncofed runs follow {directory} {name}` to watch it again, "
                   f"`oncofed runs stop {directory} {name}` to stop it", err=True)
        raise typer.Exit(code=130)
    raise typer.Exit(code=code)


def _consortium(directory: Path):
    from server.deploy import Consortium, DeployError

    try:
        return Consortium.load(directory)
    except DeployError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)


def runs_list(directory: Path = typer.Argument(..., help="the consortium directory")) -> None:
    """Every run under CONSORTIUM/runs/: its state on the SuperLink, rounds done, current stage, ETA."""
    from server.runs import list_runs, site_names

    c = _consortium(directory)
    views, names = list_runs(c.root), site_names(c.root)
    if not views:
        typer.echo(f"no runs in {c.path('runs')}; start one with `oncofed run {directory} --name NAME`")
        return
    from server.deploy import server_health

    up, why = server_health(c)
    if not up:  # a crash leaves the SuperLink's database saying "running"
        typer.echo(f"server: down ({why}); the states below are the SuperLink's last record, and no run trains")
    for v in views:
        ids = ",".join(str(i) for i in v.flwr_ids[-1:]) or "-"
        typer.echo(f"{v.name:<24} flwr run {ids:<22} {v.describe(names, '' if up else 'the server is down')}")


def runs_follow(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Argument(..., help="the run's name (its directory under CONSORTIUM/runs/)"),
    poll: float = typer.Option(2.0, "--poll", min=0.5, help="seconds between looks"),
) -> None:
    """Show a run's progress (round, SecAgg+ stage, sites answered and awaited, ETA) until it ends, then its verdict.

    Ctrl-C stops following, not the run. Exit codes as `oncofed run`'s: 0 trained and installed at every site that
    trained; 1 failed, stopped or ended without a model, or the server stayed down (stopped following); 3 trained, but
    some site that trained did not install the model (named; send it again: `oncofed deliver`). An `oncofed deliver`
    of it in progress is followed to its end first.
    """
    import sys

    from server.deploy import server_health
    from server.runs import follow_to_verdict

    c = _consortium(directory)
    if not c.path("runs", name).is_dir():
        typer.echo(f"no run {name!r} in {c.path('runs')}; see `oncofed runs list {directory}`", err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=follow_to_verdict(c.root, name, sys.stdout, poll=poll, health=lambda: server_health(c)))


def runs_stop(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Argument(..., help="the run's name"),
) -> None:
    """Stop a run on the SuperLink (its flwr runs that have not finished, an `oncofed deliver` of it too). Its
    checkpoints stay: `oncofed run --name NAME --resume` continues it later; a stopped delivery is recorded in the
    run's directory, and `oncofed deliver` sends the model again."""
    import sys

    from privacy.preflight import check_reachable
    from privacy.registry import foreign_superlink
    from server.deploy import DeployError
    from server.runs import RunView, delivery_ended_early, restart_hint, stop
    from server.submit import env_for

    c = _consortium(directory)
    if not c.path("runs", name).is_dir():
        typer.echo(f"no run {name!r} in {c.path('runs')}; see `oncofed runs list {directory}`", err=True)
        raise typer.Exit(code=2)
    if why := foreign_superlink(c.root):
        typer.echo(f"run {name!r}: nothing stopped: {why}", err=True)
        raise typer.Exit(code=2)
    if not (link := check_reachable(c.control_address, c.path("ca", "ca.crt"), "SuperLink")).ok:
        # flwr's "Connection to the SuperLink is unavailable" followed by "nothing running to stop", exit 0, read as
        # an idle run: nothing can be stopped (nor run) while the server is down
        typer.echo(f"run {name!r}: nothing stopped: the server is not running ({link.name}: {link.detail}); start it "
                   f"(`oncofed server start {c.root}`), then stop the run if it still runs", err=True)
        raise typer.Exit(code=1)
    printed = _Tee(sys.stdout)
    try:
        trained, delivered = stop(c.root, name, env_for(c), printed)
    except DeployError as e:  # (delivery-runs.json kept locked by another command)
        typer.echo(f"run {name!r}: {e}", err=True)
        raise typer.Exit(code=1)
    if "not stopped" in printed.text:
        typer.echo(f"run {name!r}: not every flwr run of it was stopped (see above; a SuperLink restarting answers "
                   "so): run the same `oncofed runs stop` again in a minute", err=True)
        raise typer.Exit(code=1)
    if not trained + delivered:
        typer.echo(f"run {name!r}: nothing running to stop")
        return
    view = RunView.load(c.root, name, None)
    said = [restart_hint(directory, view)] if trained else []
    if delivered:
        said.append(delivery_ended_early(directory, name, view.delivery, "stopped"))
    typer.echo(f"run {name!r}: {trained + delivered} flwr run(s) stopped; {'; '.join(said)}")


class _Tee:
    """A writer that passes text on and keeps it (what `stop` said of each flwr run)."""

    def __init__(self, out):
        self.out, self.text = out, ""

    def write(self, text: str) -> None:
        self.text += text
        self.out.write(text)


def deliver(
    directory: Path = typer.Argument(..., help="the consortium directory"),
    name: str = typer.Argument(..., help="the run (its directory under CONSORTIUM/runs/)"),
) -> None:
    """Send a finished run's final model again, signed with the consortium's key, to every site that has not
    installed it (no training, no privacy spend). A dropped log stream (a SuperLink restart) is not its end: the
    delivery's flwr run is followed until it ends. Exit 0: every site that trained has it; 3: some site that trained
    still has not installed it (named); 1: the run ended without a model (no site trained), or the delivery did not
    finish (stopped by `oncofed runs stop`, ended by the server's exit, or submitted but not recorded: said, with the
    next step); 2: preflight failed (also while another `oncofed deliver` of the run, or its training, is pending or
    running, or is being submitted: named)."""
    import sys

    from privacy.preflight import PreflightError
    from server.delivery import submit_delivery
    from server.deploy import DeployError, RunFailedError, SubmittedError
    from shared_models.run_config import RunConfigError

    try:
        code = submit_delivery(directory, name, out=sys.stdout)
    except (RunFailedError, SubmittedError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=1)
    except (DeployError, PreflightError, RunConfigError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=code)
