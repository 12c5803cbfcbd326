"""Hospital-site commands: `oncofed validate`, `oncofed site init`, `oncofed site start`,
`oncofed site status`, `oncofed site privacy-audit`, `oncofed serve ...`, `oncofed predict`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from privacy import SITE_BUDGET
from shared_models.flower_tools import SERVER_ERROR_RETRY_S, SUPERNODE_POLL_S
from shared_models.limits import MIN_COUNT

if TYPE_CHECKING:
    from privacy.site_config import SiteConfig


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    site = typer.Typer(help="A hospital site's keys, trust anchors, settings and SuperNode.", no_args_is_help=True)
    site.command("init")(site_init)
    site.command("start")(site_start)
    site.command("privacy-audit")(site_privacy_audit)
    site.command("status")(site_status)
    app.add_typer(site, name="site")
    serve = typer.Typer(help="The global model as a local REST service (and its tokens).",
                        invoke_without_command=True)
    serve.callback()(serve_main)
    token = typer.Typer(help="API tokens of the prediction service.", no_args_is_help=True)
    token.command("add")(token_add)
    token.command("list")(token_list)
    token.command("revoke")(token_revoke)
    serve.add_typer(token, name="token")
    serve.command("fit-normalizer")(serve_fit_normalizer)
    serve.command("calibrate")(serve_calibrate)
    serve.command("activate")(serve_activate)
    app.add_typer(serve, name="serve")
    app.command("predict")(predict)


def validate(
    schema: Path = typer.Option(..., "--schema", help="the consortium's schema JSON"),
    data: Path = typer.Option(..., "--data", help="the site directory: labels.csv and one table per modality"),
    min_count: int = typer.Option(MIN_COUNT, "--min-count", min=1,
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
    ca_fingerprint: str = typer.Option(..., "--ca-fingerprint", help="the CA's SHA-256 fingerprint (64 hex digits) "
                                       "as the operator read it to you by phone or another channel, never from the "
                                       "bundle itself"),
    data: str = typer.Option("", "--data", help="the site directory of tables (see `oncofed validate`)"),
    budget: float = typer.Option(SITE_BUDGET, "--budget", help="the site's privacy budget (epsilon) over all runs"),
    min_count: int = typer.Option(MIN_COUNT, "--min-count", min=1, help="counts below this are never reported"),
    state_dir: str = typer.Option("", "--state-dir", help="the site's state directory: privacy ledger, audit log, "
                                  "released updates (default DIRECTORY/state). Give another site's state directory to "
                                  "keep its privacy ledger, and the epsilon spent on these patients, for this site (a "
                                  "new key, directory or consortium for the same data)"),
    allow_second_ledger: bool = typer.Option(False, "--allow-second-ledger", help="start a new, empty privacy ledger "
                                             "although another site's ledger on this machine reads the same --data "
                                             "(only when that directory now holds other patients: a round on patients "
                                             "another ledger holds is still refused)"),
) -> None:
    """Check the consortium's bundle against the CA fingerprint read out to you, then create the site's
    node-authentication key (ECDSA P-384, OpenSSH) and settings. Refused when another site of this machine reads
    the same data with a privacy ledger of its own (the message names it and the fix)."""
    from client.supernode import budget_warning
    from privacy.ledger_index import LedgerIndex
    from privacy.pki import ProvisioningError, init_site

    index = LedgerIndex()
    try:
        settings = init_site(directory, name, consortium, data, budget, min_count, ca_fingerprint=ca_fingerprint,
                             state_dir=state_dir, allow_second_ledger=allow_second_ledger, index=index)
    except ProvisioningError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    finally:
        for note in index.notes:
            typer.echo(f"warning: {note}", err=True)
    typer.echo(f"site {name!r} in {directory} for consortium {settings.consortium!r} at {settings.superlink}")
    if state_dir:
        typer.echo(_kept_ledger(Path(settings.state_dir)))
    typer.echo(f"send {directory / 'keys' / 'site.key.pub'} to the operator to register and read them its "
               f"fingerprint {settings.public_key_sha256}; the private key never leaves this machine")
    if warning := budget_warning(settings):
        typer.echo(f"warning: {warning} (privacy-budget in {directory / 'site.json'}; `oncofed site start` says this "
                   "again)")
    if data and (problems := _data_problems(settings)):
        typer.echo(problems, err=True)


def _data_problems(settings: SiteConfig) -> str:
    """What `oncofed site start` will refuse in the site's tables (its preflight validates them as this does), as a
    warning ("" when they pass). site init warns and does not refuse: the key and settings it writes do not depend on
    the tables, which can be fixed in place before the first start (a refusal would only make the site run init again)."""
    from client.supernode import validate_command, validate_data

    try:
        report = validate_data(settings)
    except (OSError, ValueError) as e:
        return f"warning: --data {settings.data_path} was not validated ({e})"
    if report.ok:
        return ""
    return (f"warning: --data {settings.data_path} fails validation against the consortium's schema "
            f"({len(report.errors)} error(s)); `oncofed site start` refuses to start until it passes:\n"
            + "\n".join(f"  {p}" for p in report.errors)
            + f"\nfix the tables in place (site.json need not change), then check: `{validate_command(settings)}`")


def _kept_ledger(state_dir: Path) -> str:
    """What `site init --state-dir` kept: the ledger and its spend, or that there is none yet."""
    from privacy.ledger import LEDGER_FILE
    from privacy.ledger_index import spend_of

    ledger = state_dir / LEDGER_FILE
    return f"privacy ledger {ledger} kept: {spend_of(ledger)}" if ledger.exists() else \
        "no privacy ledger yet (the first DP round creates it there)"


def site_start(
    directory: Path = typer.Argument(..., help="the site directory written by `oncofed site init`"),
    schema: Path = typer.Option(None, "--schema", help="not needed: the data is validated against site.json's schema "
                                "(trust/schema.json, the consortium's, as site init pinned it); a site.json without one "
                                "(older) validates against this"),
    port: int = typer.Option(9094, "--port", min=1, max=65535, help="the SuperNode's local runtime port (127.0.0.1)"),
    superlink: str = typer.Option("", "--superlink", help="override site.json's server address HOST:PORT"),
    poll_interval: float = typer.Option(SUPERNODE_POLL_S, "--poll-interval", min=0.1, max=3.0,
                                        help="seconds between the SuperNode's pulls when idle (Flower: 3)"),
    retry_seconds: float = typer.Option(SERVER_ERROR_RETRY_S, "--retry-seconds", min=0.0,
                                        help="how long the server's errors (HTTP 5xx, 429) are retried with backoff "
                                        "before the SuperNode exits 4"),
) -> None:
    """Preflight (CA, key, data, server reachable), then the site's SuperNode, in the foreground.

    Exit 2: a preflight check failed (listed). Exit 3: the server refused to activate the site (its key is not registered),
    or stopped accepting its key while it ran (the operator removed it: a new key is needed to rejoin).
    Exit 4: Flower's loop ended on an error (e.g. the server failed for longer than --retry-seconds): restart it
    (the systemd unit in docs/systemd/ does, Restart=always).
    """
    from client.supernode import claim_site, ledger_check, ledger_index_check, load_site, run_supernode, site_checks
    from privacy.preflight import PreflightError, report
    from privacy.site_config import HOST_PORT, SiteConfigError

    if superlink and not HOST_PORT.fullmatch(superlink):
        typer.echo(f"--superlink {superlink!r}: write HOST:PORT, e.g. fl.consortium.example:443", err=True)
        raise typer.Exit(code=2)
    try:
        settings = load_site(directory)
        ledger = ledger_check(directory, settings)  # before the lock file below makes the state directory
        indexed = [ledger_index_check(directory, settings)] if ledger.ok else []
        _held, claimed = claim_site(settings)  # held until this process ends: one SuperNode per site
        typer.echo(report(f"site {settings.site_name!r}",
                          [*([claimed] if claimed else []), ledger, *indexed,
                           *site_checks(settings, port, schema, superlink or None)]))
    except (SiteConfigError, PreflightError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    raise typer.Exit(code=run_supernode(settings, port, poll_interval, superlink or None, retry_seconds))



def site_status(
    directory: Path = typer.Argument(..., help="the site directory written by `oncofed site init` (its site.json)"),
) -> None:
    """The site's budget, epsilon spent and left, runs and rounds, models installed and active, and its audit log's
    last entry. Reads only (no file written, no lock taken): safe while the site and its service run."""
    from client.site_status import site_status as status
    from privacy.site_config import SiteConfig, SiteConfigError

    try:
        settings = SiteConfig.load(directory / "site.json")
    except SiteConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(status(directory, settings))


def site_privacy_audit(
    directory: Path = typer.Argument(..., help="the site directory written by `oncofed site init` (its site.json)"),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="the run's val-fraction: which of the "
                                              "site's patients were held out (default: the run config's)"),
    seed: int | None = typer.Option(None, "--seed", min=0, help="the run's seed, which fixed the held-out part "
                                    "(default: the run config's)"),
    lira_models: int = typer.Option(0, "--lira-models", min=0, help="also run offline LiRA with this many reference "
                                    "models (>= 2; trained here on halves of the site's patients; 0: skip)"),
    lira_epochs: int | None = typer.Option(None, "--lira-epochs", min=1, help="epochs of each LiRA reference model "
                                           "(default: 30)"),
    confidence: float | None = typer.Option(None, "--confidence", help="confidence of the bound test (all attacks "
                                            "together; default: 0.95)"),
    version: str = typer.Option("", "--version", help="the model version to audit (default: the active one)"),
    out: Path = typer.Option(None, "--out", help="report directory (default: STATE_DIR/privacy-audit/VERSION)"),
) -> None:
    """Attack the site's global model with membership inference: its training patients (members) against its
    held-out part (non-members; for a DP model, the half of it the normalisation was not fitted on). Prints AUC
    and TPR at 0.1% and 1% FPR per attack beside the bound the model's epsilon implies, writes privacy-audit.json
    and a ROC plot.

    Exit 0: no attack beats the bound (or the model claims no DP); 1: an attack beats the bound with the test's
    confidence (a DP bug); 2: the audit cannot run (the message says why).
    """
    from client.privacy_audit import PrivacyAuditError, audit, format_report, verdict, write_outputs
    from privacy.site_config import SiteConfig, SiteConfigError

    try:
        settings = SiteConfig.load(directory / "site.json").require("site-name", "data-path",
                                                                    fix="set it (`oncofed site init` writes it)")
        from shared_models.run_config import SiteSection, TrainingSection

        given = {k: v for k, v in (("lira_epochs", lira_epochs), ("confidence", confidence)) if v is not None}
        report = audit(Path(settings.data_path), Path(settings.state_dir), Path(settings.model_dir),
                       settings.site_name, min_count=settings.min_count, lira_models=lira_models,
                       val_fraction=SiteSection.model_fields["val_fraction"].default if val_fraction is None
                       else val_fraction,
                       seed=TrainingSection.model_fields["seed"].default if seed is None else seed,
                       version=version or None, signing_public_key=settings.signing_public_key or None, **given)
        target = out or Path(settings.state_dir) / "privacy-audit" / report["model_version"]
        json_path, plot = write_outputs(report, target)
    except (PrivacyAuditError, SiteConfigError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    except OSError as e:
        typer.echo(f"cannot write the audit to {e.filename or out}: {e.strerror}; pass a writable --out DIR", err=True)
        raise typer.Exit(code=2)
    typer.echo(format_report(report))
    typer.echo(f"report {json_path}, plot {plot}")
    typer.echo(verdict(report), err=report["flagged"])
    raise typer.Exit(code=1 if report["flagged"] else 0)


def _site_settings(site_config: Path) -> SiteConfig:
    from privacy.site_config import SiteConfig, SiteConfigError

    try:
        return SiteConfig.load(site_config)
    except SiteConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)


def serve_main(
    ctx: typer.Context,
    site_config: Path = typer.Option(None, "--site-config", help="the site's site.json"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (put TLS in front for the network)"),
    port: int = typer.Option(8088, "--port", min=1, max=65535),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="a Host name the service answers to besides "
                                           "localhost, 127.0.0.1, ::1 and --host: the name your TLS proxy forwards "
                                           "(repeatable); any other Host is refused (DNS rebinding)"),
) -> None:
    """Serve the site's active global model: /v1/predict, /v1/predict/file, /v1/model, /health, /metrics, /. A site
    with no model yet waits for its first delivery (503 until then)."""
    if ctx.invoked_subcommand is not None:
        return
    if site_config is None:
        typer.echo("--site-config is required (the site's site.json)", err=True)
        raise typer.Exit(code=2)
    import uvicorn

    from client.model_store import ModelStoreError
    from client.serve import AuditUnwritable, allowed_hosts, create_app
    from privacy.site_config import host_port

    try:
        hosts = allowed_hosts(host, allowed_host)
    except ValueError as e:
        typer.echo(f"--host/--allowed-host {e}", err=True)
        raise typer.Exit(code=2)
    try:
        app = create_app(_site_settings(site_config), hosts=hosts)
    except (ModelStoreError, ValueError, AuditUnwritable) as e:  # (a fallback at start is audited)
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    import sys

    degraded = app.state.predictor.degraded
    if degraded:
        typer.echo(f"DEGRADED: {degraded['reason']}", err=True)
    current, url = app.state.predictor.current, f"http://{host_port(host, port)}/"
    if current is None:  # a site before its first delivery: a supervisor's unit must not crash-loop until then
        typer.echo(f"no model installed yet in {app.state.predictor.store.root}: waiting for the first model on {url} "
                   "(/health and predictions answer 503 until it is installed; it is served then, without a restart)")
    else:
        typer.echo(f"serving model {current.version} on {url}")
    # the event loop takes the GIL back from the model and parsing threads within 1 ms (default 5 ms):
    # /health and small requests stay fast while an explanation or an upload is being worked on
    sys.setswitchinterval(0.001)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def token_add(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    name: str = typer.Option(..., "--name", help="who or what uses the token"),
    role: str = typer.Option("clinician", "--role", help="clinician (predict), admin (also activate, roll back, "
                              "/metrics) or monitoring (/metrics only: for Prometheus)"),
    replace: bool = typer.Option(False, "--replace", help="revoke the existing token of this name and issue a new one"),
) -> None:
    """Create a token (printed once; only its SHA-256 is stored)."""
    from client.serve import TOKENS_FILE, TokenStore

    settings = _site_settings(site_config)
    try:
        token = TokenStore(Path(settings.state_dir) / TOKENS_FILE).add(name, role, replace=replace)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(token)


def token_list(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
) -> None:
    """Names, roles and creation dates of the site's tokens (the tokens themselves are never stored)."""
    import datetime

    from client.serve import TOKENS_FILE, TokenStore

    settings = _site_settings(site_config)
    try:
        tokens = TokenStore(Path(settings.state_dir) / TOKENS_FILE).list()
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    if not tokens:
        typer.echo("no tokens; create one with `oncofed serve token add --name NAME --role clinician`")
        return
    typer.echo(f"{'name':<24} {'role':<10} created (UTC)")
    for t in tokens:
        created = datetime.datetime.fromtimestamp(t["created"] or 0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{t['name']:<24} {t['role']:<10} {created}")


def serve_calibrate(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    data: Path = typer.Option(..., "--data", help="the site's labelled tables (labels.csv and the modalities)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the fit / held-out split"),
) -> None:
    """Temperature-scale the active model on the site's labelled patients; ECE before/after on held-out ones."""
    from client.calibration import calibrate

    try:
        r = calibrate(_site_settings(site_config), data, seed)
    except (ValueError, OSError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    h = r["heldout"]
    typer.echo(f"model {r['model_version']}: temperature {r['temperature']:.3f} fitted on {r['n_fit']} patients; on "
               f"{r['n_heldout']} held-out patients ECE {h['ece_before']:.3f} -> {h['ece_after']:.3f}, log-loss "
               f"{h['log_loss_before']:.3f} -> {h['log_loss_after']:.3f} (accuracy {h['accuracy']:.3f}, unchanged)")
    if r["overall_not_fitted"]:
        typer.echo(f"overall temperature kept at 1 (the model's own probabilities): {r['overall_not_fitted']}")
    if r["left_out_trained"] is None:
        typer.echo("warning: the model's version does not say which of these patients its run trained on (installed "
                   "by older OncoFed code): all were used, and any it trained on make it look more accurate and surer than "
                   "it is", err=True)
    else:
        typer.echo(f"left out: {r['left_out_trained']} patients in the training part of the run that made the model")
    if r.get("left_out_labels"):
        typer.echo("left out, labels of no class of the schema: " + ", ".join(
            f"{k} ({v})" for k, v in sorted(r["left_out_labels"].items())))
    settings = _site_settings(site_config)
    _echo_patterns(r["patterns"], settings.serve.min_pattern_accuracy, r["consortium"])
    never = sorted((t for t, e in r["types"].items() if e["recall"] == 0 and e["n"] >= 3), key=lambda t: -r["types"][t]["n"])
    if never:
        typer.echo("types the model named right for none of your patients of them (a type no site trained on, or one "
                   "too rare for its training to pick out; a patient of such a type is answered with another): "
                   + ", ".join(f"{t} ({r['types'][t]['n']})" for t in never))
    typer.echo(f"-> {r['path']} (served from the next request)")


def _echo_patterns(patterns: dict, floor: float, consortium: dict | None = None) -> None:
    """serve calibrate's table of modality patterns, weakest first; beside each, the model package's measurement of it
    on the consortium's held-out patients, where it has one (what answers were judged by before this calibration)."""
    if not patterns:
        typer.echo("modality patterns: none with enough patients in both halves to measure"
                   + ("; answers stay judged by the model package's measurement (the consortium's)" if consortium
                      else ""))
        return
    typer.echo(f"modality patterns (the others masked), on the held-out half, weakest first; below {floor:.0%}: "
               "answers flagged weak_pattern" + ("; consortium: the model package's accuracy on the sites' held-out "
                                                 "patients" if consortium else ""))
    typer.echo(f"  {'modalities present':<44} {'patients':>8} {'accuracy':>8} {'ECE before':>10} {'after':>6} "
               f"{'temperature':>11}" + (f" {'consortium':>10}" if consortium else ""))
    for key, e in sorted(patterns.items(), key=lambda kv: (kv[1]["accuracy"], kv[0])):
        t = "-" if e["temperature"] is None else f"{e['temperature']:.3f}"
        after = "-" if e["ece_after"] is None else f"{e['ece_after']:.3f}"
        mark = "  weak" if e["accuracy"] < floor else ""
        theirs = "" if not consortium else f" {consortium[key]['accuracy']:>10.3f}" if key in consortium else \
            f" {'-':>10}"
        typer.echo(f"  {key:<44} {e['n_heldout']:>8} {e['accuracy']:>8.3f} {e['ece_before']:>10.3f} {after:>6} "
                   f"{t:>11}{theirs}{mark}")
    if consortium and (rest := sorted(set(consortium) - set(patterns))):
        typer.echo(f"  {len(rest)} more patterns keep the model package's measurement (too few of your patients), e.g. "
                   f"{rest[0]} {consortium[rest[0]]['accuracy']:.3f}")
    refused = [k for k, e in patterns.items() if e["temperature"] is None]
    if refused:
        typer.echo(f"  ({len(refused)} patterns keep the overall temperature: their own fit was refused, e.g. "
                   f"{refused[0]}: {patterns[refused[0]]['refused']})")


def token_revoke(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    name: str = typer.Option(..., "--name"),
) -> None:
    """Revoke a token by name."""
    from client.serve import TOKENS_FILE, TokenStore

    settings = _site_settings(site_config)
    try:
        revoked = TokenStore(Path(settings.state_dir) / TOKENS_FILE).revoke(name)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    if not revoked:
        typer.echo(f"no token named {name!r}", err=True)
        raise typer.Exit(code=1)


def serve_fit_normalizer(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    data: Path = typer.Option(..., "--data", help="the hospital's tables; with labels.csv (diagnoses) the case mix "
                                                   "is checked against the model"),
    schema: Path = typer.Option(None, "--schema", help="default: the active model's schema"),
    unlabelled: bool = typer.Option(False, "--unlabelled", help="no labels table: the patients are a general cancer "
                                                                "hospital's mix of types (not checked)"),
) -> None:
    """A hospital that never trained: fit the input normalisation on its own patients (of many cancer types)."""
    from client.serve import fit_normalizer

    from client.prediction_input import PredictionInputError

    try:
        path, n, notes = fit_normalizer(_site_settings(site_config), data, schema, unlabelled=unlabelled)
    except PredictionInputError as e:
        _echo_problems(f"{data}: refused, the normalisation was not changed:", e)
        raise typer.Exit(code=2)
    except (ValueError, OSError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"normalisation fitted on {n} patients: {path}")


def serve_activate(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    version: str = typer.Option(..., "--version", help="an installed version, e.g. v0002"),
) -> None:
    """Make an installed model version the one served (verified first: a package that does not verify is never
    made active). A running service picks it up at its next request, as after POST /v1/models/activate."""
    import getpass

    from client.model_store import ModelStoreError
    from client.predict import Predictor
    from privacy.audit import AUDIT_FILE, AuditLog

    settings = _site_settings(site_config)
    state = Path(settings.state_dir)
    predictor = Predictor.for_site(settings, load_active=False)
    versions, previous = predictor.store.versions(), predictor.store.active()
    if version not in versions:
        typer.echo(f"--version {version}: not installed in {settings.model_dir}; installed: "
                   f"{', '.join(versions) or 'none'}", err=True)
        raise typer.Exit(code=2)
    from privacy.audit import AuditError

    audit, token = AuditLog(state / AUDIT_FILE), f"cli:{getpass.getuser()}"

    def record() -> None:  # after the version verified, before the switch: no switch the audit log lacks
        audit.append("model_activated", version=version, previous=previous, token=token)

    def record_failed(reason: str) -> None:
        audit.append("model_activation_failed", version=version, active=previous, token=token, reason=reason)

    try:
        predictor.activate(version, record=record, record_failed=record_failed)  # verified first, as the route does
    except AuditError as e:
        typer.echo(f"the audit log cannot record the switch, nothing changed: {e}", err=True)
        raise typer.Exit(code=2)
    except (ModelStoreError, ValueError, OSError) as e:
        typer.echo(f"{version} cannot be activated, nothing changed: {e}", err=True)
        raise typer.Exit(code=2)
    typer.echo(f"{version} is active (was {previous or 'none'})")


def _echo_problems(headline: str, e) -> None:
    """A refusal of the prediction contract, one problem per line with its fix (as the service answers it)."""
    typer.echo(headline, err=True)
    for p in e.problems:
        who = f"\n    patients: {', '.join(map(str, p['patients']))}" if p.get("patients") else ""
        typer.echo(f"  {p['loc']}: {p['msg']}{who}" + (f"\n    fix: {p['fix']}" if p.get("fix") else ""), err=True)


def predict(
    site_config: Path = typer.Option(..., "--site-config", help="the site's site.json"),
    data: Path = typer.Option(..., "--data", help="tables in the site layout (labels not needed)"),
    out: Path = typer.Option(..., "--out", help="predictions.csv"),
    batch_size: int = typer.Option(512, "--batch-size", min=1),
) -> None:
    """Batch predictions of the active model for every patient of a site directory."""
    import getpass

    from client.model_store import ModelStoreError
    from client.predict import PredictionInputError, Predictor, refuse_weak_patterns
    from client.serve import _site_salt
    from privacy.audit import AUDIT_FILE, AuditError, AuditLog

    settings = _site_settings(site_config)
    if not data.is_dir():
        typer.echo(f"--data {data}: not a directory (the tables, one per modality, named after it)", err=True)
        raise typer.Exit(code=2)
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        typer.echo(f"--out {out}: " + ("a directory; name the file to write" if out.is_dir() else
                                        f"{out.parent} is not a directory this user may write to; choose another path"),
                   err=True)
        raise typer.Exit(code=2)
    state = Path(settings.state_dir)
    audit = AuditLog(state / AUDIT_FILE)
    try:
        limits = settings.serve.model_copy(update={"max_patients": 10**9})
        predictor = Predictor.for_site(settings, on_fallback=lambda entry: audit.append("model_fallback", **entry))
        checked = predictor.checked_tables(data, limits)
        refuse_weak_patterns(predictor.current, checked, limits)
    except PredictionInputError as e:  # the service's contract: the same problems, one per line
        _echo_problems(f"{data}: refused, nothing predicted:", e)
        raise typer.Exit(code=2)
    except (ModelStoreError, ValueError, OSError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    if predictor.degraded:
        typer.echo(f"warning: {predictor.degraded['reason']}", err=True)
    lm, ids, raw = predictor.current, checked.ids, checked.raw
    classes = lm.schema.classes
    user, salt = getpass.getuser(), _site_salt(state)
    # written beside `out` and renamed only once every batch is audited: no prediction reaches a file unaudited
    partial = Path(out).with_name(f".{Path(out).name}.partial")
    try:
        _predict_batches(partial, predictor, lm, ids, raw, checked, batch_size, limits, audit, salt, user, classes)
    except (AuditError, OSError) as e:
        partial.unlink(missing_ok=True)
        typer.echo(f"the site's audit log or {out} cannot be written ({e}): no predictions were written", err=True)
        raise typer.Exit(code=2)
    os.replace(partial, out)
    for w_ in checked.warnings:
        typer.echo(f"warning: {w_['loc']}: {w_['msg']}", err=True)
    typer.echo(f"{len(ids)} patients -> {out} (model {lm.version}{', calibrated' if lm.calibration else ''})")


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell a spreadsheet would read as a formula (a patient id `=HYPERLINK(...)`) kept as text, with a leading
    single quote (OWASP's advice for CSV injection); the page's export does the same (client/web/index.html)."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def _predict_batches(path, predictor, lm, ids, raw, checked, batch_size, limits, audit, salt, user, classes) -> None:
    """`oncofed predict`'s CSV, batch by batch: each batch audited (one entry) before its rows are written."""
    import csv

    from rich.progress import Progress

    from client.predict import answer_warnings
    from client.serve import prediction_entry

    with open(path, "w", newline="") as fh, Progress(transient=True) as bar:
        w = csv.writer(fh)

        def row(cells) -> None:
            w.writerow([spreadsheet_safe(str(c)) for c in cells])

        row(["id", "predicted", "probability", "model_version", "coverage", "warnings", *[f"p_{c}" for c in classes]])
        task = bar.add_task("predicting", total=len(ids))
        for start in range(0, len(ids), batch_size):
            _, result = predictor.predict(raw[start:start + batch_size], lm=lm)
            batch_ids = ids[start:start + batch_size]
            audit.append_many([prediction_entry(salt, user, lm.version, batch_ids,  # one entry per batch, first
                                                [classes[int(k)] for k in result["predicted"]], "cli")])
            for i, pid in enumerate(batch_ids):
                p = result["probabilities"][i]
                k = int(result["predicted"][i])
                note = checked.notes[start + i]
                more, _ = answer_warnings(lm, float(p[k]), result["counted"][i], limits)
                # the request's own warnings (columns ignored, ...) on every row too: the file is what gets read later
                flags = list(dict.fromkeys([x["code"] for x in note["warnings"] + more + list(checked.warnings)]))
                row([pid, classes[k], f"{p[k]:.6f}", lm.version, f"{note['coverage_total']:.3f}", ";".join(flags),
                     *[f"{v:.6f}" for v in p]])
            bar.advance(task, min(batch_size, len(ids) - start))
        fh.flush()
        os.fsync(fh.fileno())
