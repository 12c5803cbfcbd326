"""`oncofed site start`: preflight, then Flower's SuperNode with the site's key, CA and node config.

The site's settings are its site.json (`oncofed site init`). The SuperNode runs in this process
(flwr's own `flower-supernode` entry point); two of its idle waits are shortened, both within what
Flower exposes: the SuperExec task poll through its documented FLWR_SUPEREXEC_TASK_POLL_INTERVAL, and
the SuperNode's 3 s sleep between empty pulls (a module-level `time.sleep(3)` in
flwr.supernode.start_client_internal, 1.41) through `poll_interval`. Every SecAgg+ round is four
message exchanges, each waiting for the slowest site's next pull: at 3 s a deployment round spent
most of its time asleep (2 rounds took 2 min 47 s by hand before this).
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING

from privacy.preflight import (Check, check_ca, check_port_free, check_reachable, check_site_key, free_port_after,
                               port_holder, port_in_use)
from privacy.site_config import NODE_CONFIG_KEYS, SITE_CONFIG_KEY, SiteConfig, replace_key_command
from shared_models.flower_tools import QUIET_ENV, RETRIED_STATUS, SERVER_ERROR_RETRY_S, SUPERNODE_POLL_S, flower_tool
from shared_models.limits import MIN_COUNT

if TYPE_CHECKING:
    from shared_models.validation import ValidationReport

UNREGISTERED_EXIT = 305  # flwr's exit code when the SuperLink refuses to activate the node (e.g. unknown key)


REFUSED_EXIT = 3  # what `oncofed site start` exits with then (305 does not fit in an exit status)
LOOP_ENDED_EXIT = 4  # Flower's loop ended on an error it does not retry: restart the SuperNode (systemd does)
# The SuperLink's transient failures ("database is locked" under load surfaces as HTTP 500): retried with
# Flower's own backoff (exponential, jittered, at most 20 s apart) for this long before the loop gives up.


def load_site(site_dir: str | Path) -> SiteConfig:
    """The site's settings with everything the SuperNode needs set, or SiteConfigError naming the key."""
    return SiteConfig.load(Path(site_dir).resolve() / "site.json").require(
        "site-name", "superlink", "root-certificates", "auth-supernode-private-key", "privacy-budget", "data-path",
        fix="set it in site.json (`oncofed site init` wrote it; a new `site init` would start an empty privacy "
            "ledger elsewhere, forgetting the budget spent)")


def node_config(settings: SiteConfig) -> str:
    """The SuperNode's --node-config: the ClientApp reads the site's authority from it (client/app.py)."""
    values = _node_values(settings)
    return " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in values.items())


def _node_values(settings: SiteConfig) -> dict:
    """What the node config carries: every set NODE_CONFIG_KEYS setting, and site.json's own path when the settings
    were loaded from it (the training app re-reads its policy there at every message: privacy.site_config.stricter)."""
    values = settings.model_dump(by_alias=True, exclude_unset=True)
    if Path(settings._source).is_file():
        values[SITE_CONFIG_KEY] = str(Path(settings._source).resolve())
    return {k: values[k] for k in (*NODE_CONFIG_KEYS, SITE_CONFIG_KEY) if values.get(k, "") != ""}


def _node_config_check(settings: SiteConfig) -> Check:
    """Flower parses the --node-config string itself: a value it cannot carry (a quote in a path) would stop the
    SuperNode after every check passed, and a restart would meet it again."""
    from flwr.common.config import parse_config_args

    def carried(key: str, value) -> bool:
        try:
            return parse_config_args([f"{key}={json.dumps(value, ensure_ascii=False)}"]).get(key) == value
        except Exception:  # noqa: BLE001 - Flower's parser refuses it
            return False

    wrong = [k for k, v in _node_values(settings).items() if not carried(k, v)]
    return Check("node config for Flower", not wrong, "carries every setting" if not wrong else
                 f"Flower's --node-config cannot carry site.json's {', '.join(wrong)}: write those values without a "
                 "double quote (\") (move or rename the directory a path names)")


def clientapp_check() -> Check:
    """The site's SuperExec launches `oncofed-clientapp` (client/clientapp_process.py), installed with OncoFed beside
    this Python: without it no round could start, and a site never falls back to Flower's unchecked launcher."""
    from client.clientapp_process import CLIENTAPP_COMMAND, launcher

    path = launcher()
    return Check(f"{CLIENTAPP_COMMAND}", path.is_file(), "runs each round's app once it is this installation's code"
                 if path.is_file() else f"not installed beside {sys.executable}: reinstall OncoFed into this "
                 "environment (`pip install -e .` in the checkout, or the version's wheel)")


def budget_warning(settings: SiteConfig) -> str:
    """Why the site's privacy budget refuses every run at the consortium's default settings ("" if it does not, or
    it has no budget: load_site requires one)."""
    from privacy.accounting import low_budget_warning

    return low_budget_warning(settings.privacy_budget, settings.privacy_delta) if settings.privacy_budget else ""


def site_checks(settings: SiteConfig, port: int, schema: Path | None, superlink: str | None = None) -> list[Check]:
    ca = Path(settings.root_certificates)
    checks = [check_ca(ca), check_site_key(Path(settings.auth_supernode_private_key))]
    if settings.privacy_budget:  # a warning, not a refusal: a site may mean to be strict
        warning = budget_warning(settings)
        checks.append(Check(f"privacy-budget {settings.privacy_budget:g}", True, warning or
                            "joins a run at the consortium's default settings", warning=bool(warning)))
    if settings.signing_public_key:
        from privacy.signing import SignatureError, load_public

        try:
            load_public(settings.signing_public_key)
            checks.append(Check(f"model-signing trust anchor {settings.signing_public_key}", True, "Ed25519"))
        except (SignatureError, OSError, ValueError) as e:
            checks.append(Check(f"model-signing trust anchor {settings.signing_public_key}", False,
                                f"unreadable ({e}); copy signing.pub from the consortium's public/ bundle"))
    elif settings.simulated:
        checks.append(Check("model-signing trust anchor", True, "not set (a simulated site): delivered models are "
                            "installed without checking their signature", warning=True))
    else:
        checks.append(Check("model-signing trust anchor", False, settings.unverifiable()))
    data = Path(settings.data_path)
    schema_ok, schema = _schema_check(settings, schema)
    if schema_ok is not None:
        checks.append(schema_ok)
    if schema is not None:
        checks.append(_data_check(settings, schema))
    elif schema_ok is not None and not schema_ok.ok:
        checks.append(Check(f"site data {data}", False, "not validated: the schema above must be fixed first"))
    else:
        checks.append(Check(f"site data {data}", data.is_dir(), "present (pass --schema to validate it)" if
                            data.is_dir() else "not a directory: set data-path in site.json"))
    checks.append(_node_config_check(settings))
    checks.append(clientapp_check())
    for key, d in (("state-dir", Path(settings.state_dir)), ("model-dir", Path(settings.model_dir))):
        try:  # written to, as the ledger and the model store will be: an existing root-owned directory is not enough
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".preflight-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            checks.append(Check(f"{key} {d}", True, "writable"))
        except OSError as e:
            checks.append(Check(f"{key} {d}", False, f"cannot be written by this account ({e.strerror}): `chown -R` "
                                "it to the account that runs the site"))
    checks.append(runtime_port_check(port))
    checks.append(check_reachable(superlink or settings.superlink, ca, "consortium server"))
    return checks


def runtime_port_check(port: int) -> Check:
    """The SuperNode's local runtime port, free; when another process listens there (a second site of this machine:
    every `site start` takes 9094 unless told), the check names it and a port free now."""
    check = check_port_free("127.0.0.1", port, "local runtime port")
    if not port_in_use(check):
        return check
    return Check(check.name, False, f"held by {port_holder(port).text}; each site on this machine needs a runtime port of "
                 f"its own: start this one with `--port {free_port_after(port) or 'PORT'}` (in the systemd unit, on "
                 "its ExecStart line)")


SITE_LOCK = "supernode.lock"  # in the state directory: held by the one `oncofed site start` of the site


def claim_site(settings: SiteConfig) -> tuple[object | None, Check | None]:
    """(the open lock file, held for this process's life, and its check): one SuperNode per site. A second one with
    the same key is refused activation by the SuperLink while the first is online (Flower's error 2004, which reads as
    an unregistered key), and started while the first is reconnecting, the two would take turns pulling the site's
    rounds with one state directory. (None, None) when the state directory cannot be written: its own check says so."""
    from shared_models.files import exclusive_lock

    path = Path(settings.state_dir) / SITE_LOCK
    try:
        fh = exclusive_lock(path)
    except OSError:
        return None, None
    name = f"one SuperNode for this site ({path})"
    if fh is None:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        return None, Check(name, False, f"another `oncofed site start` of this site is running{f' (pid {holder})' if holder else ''} "
                           "with this state directory: stop it first (`systemctl stop oncofed-site`), or leave it "
                           "running and do not start a second one")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, Check(name, True, "no other SuperNode of this site is running")


LEDGER_MARK = ".ledger-state-dir"  # in the site directory: the state directory the site last started with (JSON)


def ledger_check(site_dir: Path, settings: SiteConfig) -> Check:
    """The privacy ledger is where the site's spend was recorded; a site that starts without it would begin a new one
    from zero at its first DP round, forgetting the epsilon spent. Refused: an edited state-dir (a typo) naming a
    directory without a ledger while the state directory the site last started with (or, before any start, site
    init's `state/`) holds one; and the state directory the site last started with, which held a ledger then,
    holding none now (its files moved, site.json not edited). What the check saw is recorded (atomically) when it
    passes."""
    from privacy.ledger import LEDGER_FILE
    from shared_models.files import write_json_atomic

    state = Path(settings.state_dir).resolve()
    ledger, mark = state / LEDGER_FILE, Path(site_dir) / LEDGER_MARK
    name = f"privacy ledger {ledger}"
    try:
        seen = json.loads(mark.read_text())
        before, had = Path(seen["state-dir"]), bool(seen["ledger"])
    except (OSError, ValueError, KeyError, TypeError):  # never started with this check, or the mark is damaged
        before, had = Path(site_dir).resolve() / "state", None
    try:
        present = ledger.exists()
        before_has = (before / LEDGER_FILE).exists()
    except OSError as e:
        return Check(name, False, f"cannot be looked for ({e.strerror}): let the site's account read {state}")
    lost = " (a new ledger would start from zero and forget the privacy budget spent)"
    if not present and before != state and before_has:
        return Check(name, False, f"missing, but this site trained with the ledger in {before}: set site.json's "
                     f"state-dir back to {before}, or move that directory's files to {state}{lost}")
    if not present and before == state and (had or (had is not None and not state.exists())):
        # the ledger seen at the last start is gone, or the whole directory is (moved after a first round since)
        return Check(name, False, f"missing, but {'it' if had else 'its directory'} was there when this site last "
                     f"started: put the state directory's files back in {state}, or set site.json's state-dir to "
                     f"where they were moved{lost}")
    try:
        write_json_atomic(mark, {"state-dir": str(state), "ledger": present})
    except OSError:
        pass  # a read-only site directory: the check still guards site init's state/
    if not present:
        short = budget_left_warning(settings.privacy_budget, 0.0) if settings.privacy_budget else ""
        return Check(name, True, "none yet (the first DP round creates it)" + (
            f"; {short or budget_left(settings.privacy_budget)}" if settings.privacy_budget else ""), warning=bool(short))
    return _ledger_state(name, ledger, settings)


def ledger_index_check(site_dir: Path, settings: SiteConfig) -> Check:
    """This site in the machine's index of privacy ledgers (privacy/ledger_index.py), as site.json says now: fails when
    the index cannot be written (a round's claim on its patients could not be recorded, and every DP round would be
    refused); warns when another site's ledger reads the same data-path (a round is refused here on patients that
    ledger has spent on, or claimed first). Call after `ledger_check` passed: it records this ledger's path."""
    from privacy.ledger import LEDGER_FILE
    from privacy.ledger_index import LedgerIndex, LedgerIndexError

    index = LedgerIndex()
    ledger = Path(settings.state_dir).resolve() / LEDGER_FILE
    name = f"ledger index {index.path}"
    try:
        others = index.reading(settings.data_path, ledger)
        index.record(ledger, data_path=settings.data_path, site_dir=Path(site_dir).resolve())
    except LedgerIndexError as e:
        return Check(name, False, str(e).removeprefix(f"{index.path}: "))
    notes = "".join(f"; {note}" for note in index.notes)
    if others:
        return Check(name, True, f"another site of this machine reads {settings.data_path}: "
                     f"{'; '.join(o.describe() for o in others)}. A round on patients that ledger has spent on (or "
                     f"claimed first) is refused here: to keep one ledger for them, stop that site and set this "
                     f"site.json's state-dir to {others[0].state_dir}{notes}", warning=True)
    return Check(name, True, f"no other site of this machine reads this site's data{notes}", warning=bool(notes))


def _ledger_state(name: str, ledger: Path, settings: SiteConfig) -> Check:
    """What the site has spent, as its last committed round recorded it (no accounting run here), or a warning that
    the ledger is unreadable: the site then refuses every round (it still receives models), so the SuperNode starts."""
    from privacy.accounting import BudgetError
    from privacy.ledger import read_ledger, recorded_spend

    try:
        state = read_ledger(ledger)
        spent, committed, pending = recorded_spend(state)
    except (BudgetError, TypeError, ValueError) as e:
        return Check(name, True, str(e).removeprefix(f"{ledger}: ") if isinstance(e, BudgetError) else
                     f"privacy ledger damaged ({e}); restore it from a backup. Training is refused until then",
                     warning=True)
    detail = (f"epsilon {spent:.3f} of the budget {settings.privacy_budget:g} spent (delta {state.get('delta')}) in "
              f"{committed} round(s)")
    if pending:
        detail += f"; {pending} round(s) begun and not finished (a crash or a refusal): counted as spent, not shown"
    short = budget_left_warning(settings.privacy_budget, spent) if settings.privacy_budget else ""
    return Check(name, True, f"{detail}; {short or budget_left(settings.privacy_budget - spent)}" if
                 settings.privacy_budget else detail, warning=bool(short))


def budget_left(left: float) -> str:
    """The budget left, in runs at the consortium's default epsilon."""
    from privacy.accounting import default_run_epsilon

    run = default_run_epsilon()
    return f"epsilon {left:.3g} left: {int(left // run)} more run(s) at the consortium's default epsilon {run:g}"


def budget_left_warning(budget: float, spent: float) -> str:
    """Why what is left of the budget is less than one run at the consortium's default settings spends ("" if it is
    not). A warning, not a refusal: the budget is the site's decision; but at the defaults (budget 8, run epsilon 8)
    the first run spends nearly all of it and every later run is refused in every round, which nothing said before."""
    from privacy import MIN_RUN_SHARE
    from privacy.accounting import default_run_epsilon

    run, left = default_run_epsilon(), max(budget - spent, 0.0)
    if left >= run:
        return ""
    then = (f"this site refuses every new run at those settings (it joins one only with at least half its epsilon, "
            f"{MIN_RUN_SHARE * run:g}, left)" if left < MIN_RUN_SHARE * run else
            "a new run at those settings trains on what is left, with more noise than the run's own")
    return (f"epsilon {left:.3g} left, less than the {run:g} one run at the consortium's default settings spends: "
            f"{then}. The budget is for these patients' whole lifetime, across runs; raising privacy-budget in "
            "site.json is your data-protection officer's decision (docs/hospital-guide.md, \"Your privacy budget\")")


def _schema_check(settings: SiteConfig, given: Path | None) -> tuple[Check | None, Path | None]:
    """The schema training uses is site.json's (the consortium's, as the bundle brought it): checked against the
    bundle's SHA-256, and the one the data is validated with; a --schema that is missing or differs is refused (the
    data is still validated against site.json's)."""
    from privacy.pki import fingerprint

    if not settings.schema_path:
        return None, given  # a site.json without one (older): the given schema, if any
    own = Path(settings.schema_path)
    name = f"schema {own}"
    if not own.is_file():
        return Check(name, False, "missing: copy schema.json from the consortium's public bundle to it"), None
    try:
        digest = fingerprint(own)
    except OSError as e:
        return Check(name, False, f"cannot be read by this account ({e.strerror}): give the account that runs the "
                     "site read access to it"), None
    if settings.schema_sha256 and digest != settings.schema_sha256:
        return Check(name, False, "its SHA-256 differs from site.json's schema-sha256 (the consortium's): the file "
                     "was altered; copy schema.json from the consortium's public bundle again"), None
    # --schema is redundant here: a wrong one fails the preflight (it was asked for), but the data is still validated
    # against site.json's, so that its problems are listed in the same start
    leave_out = f"leave --schema out: site.json's schema {own} (the consortium's) is the one training uses and the " \
                "data is validated against"
    if given is not None and not Path(given).is_file():
        return Check(f"--schema {given}", False, f"no such file; {leave_out}"), own
    if given is not None and fingerprint(given) != digest:
        return Check(name, False, f"--schema {given} is not the schema training uses; {leave_out}"), own
    return Check(name, True, "the consortium's (SHA-256 as the bundle's)"), own


def validate_data(settings: SiteConfig, schema_path: Path | None = None) -> ValidationReport:
    """The site's tables against the schema (site.json's unless given): `site start`'s preflight and `site init`'s
    warning. At the site's own min-count, not the default: a run trains at the larger of it and the run's
    (client.app.prepared), and a larger one refuses nothing more (a label leak needs two values each held by
    min-count patients), so what passes here every run trains on. OSError or ValueError when nothing can be read."""
    from shared_models.schema import FeatureSchema
    from shared_models.validation import validate_site

    schema = FeatureSchema.load(schema_path or settings.schema_path)
    return validate_site(schema, settings.data_path, min_count=settings.min_count)


def validate_command(settings: SiteConfig, schema_path: Path | None = None) -> str:
    """The `oncofed validate` that lists what `validate_data` found: at the site's min-count, as it validated."""
    count = f" --min-count {settings.min_count}" if settings.min_count != MIN_COUNT else ""
    return f"oncofed validate --schema {schema_path or settings.schema_path} --data {settings.data_path}{count}"


def _data_check(settings: SiteConfig, schema_path: Path) -> Check:
    name = f"site data {Path(settings.data_path)}"
    try:
        rep = validate_data(settings, schema_path)
    except (OSError, ValueError) as e:
        return Check(name, False, f"{e}")
    if not rep.ok:
        first = rep.errors[0]
        return Check(name, False, f"fails validation ({len(rep.errors)} error(s); first: {first.where}: {first.message}); "
                     f"run `{validate_command(settings, schema_path)}` for all")
    return Check(name, True, f"valid against {schema_path.name}")


def _patch_idle_poll(poll_interval: float) -> None:
    from flwr.supernode import start_client_internal as sci

    real = time

    class _Clock(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            real.sleep(min(seconds, poll_interval))

    sci.time = _Clock("time")


def _launch_reaping_superexec(sci) -> None:
    """The SuperNode (flwr.supernode.start_client_internal, 1.41) launches `flower-superexec` with a bare
    `subprocess.Popen(command)`: it launches client/flower_superexec.py instead, Flower's SuperExec that reaps the
    ClientApps it launched."""
    import subprocess

    from client.flower_superexec import superexec_command

    sci.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": lambda command, *a, **kw: subprocess.Popen(
        superexec_command(list(command)), *a, **kw)})


def _patch_retries(window: float) -> None:
    """Retry the SuperLink's 5xx answers (and 429) with backoff instead of ending the loop.

    flwr 1.41's HTTP retry invoker retries transport errors and 502/503/504 only: one 500 on
    `pull-messages` escaped the SuperNode's loop, its connection closed ("deactivated") and the process
    then hung in `threading._shutdown` on the Runtime API thread (issue 17). Every request of the loop
    goes through this invoker; an error that lasts longer than `window` still ends the loop (and then
    `run_supernode` exits LOOP_ENDED_EXIT). The heartbeat thread had the same flaw: a 500 killed it, so
    the SuperLink soon saw the site as offline; it now retries too.
    """
    import httpx
    from flwr.supercore.heartbeat import HeartbeatFailure, HeartbeatSender
    from flwr.supernode import fleet_http_connection as fhc

    make_invoker = fhc.make_simple_http_retry_invoker

    def make_retrying_invoker():
        invoker = make_invoker()
        flwr_giveup, flwr_success = invoker.should_giveup, invoker.on_success
        first_failure: list[float | None] = [None]

        def should_giveup(exc: Exception) -> bool:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in RETRIED_STATUS:
                now = time.monotonic()
                first_failure[0] = first_failure[0] or now
                if now - first_failure[0] < window:
                    sys.stderr.write(f"the consortium server answered {exc.response.status_code} to "
                                     f"{exc.request.url.path}; retrying with backoff\n")
                    return False
            return flwr_giveup(exc) if flwr_giveup else False

        def on_success(state) -> None:
            first_failure[0] = None
            if flwr_success:
                flwr_success(state)

        invoker.should_giveup, invoker.on_success = should_giveup, on_success
        return invoker

    class RetryingHeartbeat(HeartbeatSender):
        def _heartbeat(self) -> None:
            try:
                super()._heartbeat()
            except httpx.HTTPStatusError as e:
                if e.response.status_code in RETRIED_STATUS:
                    raise HeartbeatFailure from e  # HeartbeatSender retries these with backoff
                raise

    fhc.make_simple_http_retry_invoker = make_retrying_invoker
    fhc.HeartbeatSender = RetryingHeartbeat


def _watch_key_refusals(refused: list[str]) -> None:
    """Record (in `refused`) each request the SuperLink answers 401 after the node authenticated: it no longer
    matches this site's key with its node, which is what an operator's `oncofed consortium remove-site` does to a
    connected site. Flower 1.41 then ends quietly: its heartbeat sends the process SIGINT ("SuperNode terminated
    gracefully") or its loop logs the error and returns; the site needs the reason and the fix. Each entry is the
    request's path and the server's clock less this machine's, in seconds, from the answer's Date header ("" if it
    has none): the same 401 answers a request signed at a time the server does not accept."""
    from email.utils import parsedate_to_datetime

    from flwr.supercore import date
    from flwr.supernode import fleet_http_connection as fhc

    class Watching(fhc.NodeAuthHttpInterceptor):
        def intercept(self, context, call_next):
            response = super().intercept(context, call_next)
            if response.status_code == 401:
                try:
                    # against the clock Flower signs requests with
                    skew = f"{parsedate_to_datetime(response.headers['date']).timestamp() - date.now().timestamp():.3f}"
                except (KeyError, TypeError, ValueError):
                    skew = ""
                refused.append(f"{context.request.url.path} {skew}")
            return response

    fhc.NodeAuthHttpInterceptor = Watching


# Flower's SuperLink accepts a request signed less than SYSTEM_TIME_TOLERANCE s after its own time and less than
# TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE s before it (flwr.superlink.routers.fleet.node_auth). The skew measured
# is the Date header (whole seconds, cut down) less this machine's time read after the answer came: up to 1 s below
# the true offset, and lower still by the request's round trip. So the clock is blamed only when the skew is outside
# the window by 2 s ahead or 1 s behind; one surely inside it blames the key alone; one near its edges, both.
def _clock_outside_window(skew: float) -> bool:
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    return skew <= -(SYSTEM_TIME_TOLERANCE + 2) or skew >= TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE + 1


def _clock_inside_window(skew: float) -> bool:
    """Whether the true offset is surely inside the window (see _clock_outside_window): then the key is the cause."""
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    return -SYSTEM_TIME_TOLERANCE < skew < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE - 2


def _refusal(refused: list[str]) -> tuple[str, float | None]:
    """The first refused request's path and the server's clock less this machine's (None: no Date header)."""
    path, _, skew = refused[0].partition(" ") if refused else ("", "", "")
    return path, float(skew) if skew else None


def clock_refused(settings: SiteConfig, refused: list[str]) -> str | None:
    """What a site is told when the server's 401 (_watch_key_refusals) came with a Date header that puts this
    machine's clock outside the window Flower's SuperLink accepts signatures in; None when it did not."""
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    path, skew = _refusal(refused)
    if skew is None or not _clock_outside_window(skew):
        return None
    return (f"site {settings.site_name!r}: the consortium server refused this site's signed request (it answered 401 "
            f"to {path}) because this machine's clock is {abs(skew):.0f} s "
            f"{'ahead of' if skew < 0 else 'behind'} the server's (its Date header): the server accepts a "
            f"request signed at most {SYSTEM_TIME_TOLERANCE} s ahead of or {TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE}"
            " s behind its own time. Set this machine's clock (`timedatectl set-ntp true`, or ask IT to sync it with "
            f"NTP), then start again; the site's key is not the cause. Exiting with code {REFUSED_EXIT}\n")


def key_refused(settings: SiteConfig, refused: list[str]) -> str:
    """What a site whose key the consortium no longer knows is told (see _watch_key_refusals); or, when the server's
    clock says so, that this machine's clock is the cause (clock_refused)."""
    if clock := clock_refused(settings, refused):
        return clock
    path, skew = _refusal(refused)
    return (f"site {settings.site_name!r}: the consortium server no longer accepts this site's key (it answered 401 "
            f"to {path}): the consortium does not, or no longer, know this site's key, which is what the "
            "operator's `oncofed consortium remove-site` does. Ask the operator whether this site is still a member. "
            "A removed key is never registered again: to rejoin, make a new key (docs/hospital-guide.md, \"Keys\": "
            f"{replace_key_command(settings.auth_supernode_private_key)}), send its .pub to the operator for "
            "`oncofed consortium add-site`, then start again."
            + ("" if skew is not None and _clock_inside_window(skew) else " If the operator says the key is registered, check this machine's clock (`timedatectl`: "
               "the server refuses requests signed at a time far from its own).")
            + f" Exiting with code {REFUSED_EXIT}\n")


def _exit_now(code: int) -> None:
    """Flower's exit handlers (stop the Runtime API server thread), then exit even if a thread lingers."""
    import os
    import threading

    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    threading.Timer(10.0, lambda: os._exit(code)).start()
    for before in (True, False):
        trigger_exit_handlers(run_before_force_exit=before)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def supernode_argv(settings: SiteConfig, port: int, superlink: str | None = None) -> list[str]:
    return [flower_tool("flower-supernode"), "--superlink", superlink or settings.superlink,
            "--root-certificates", settings.root_certificates,
            "--auth-supernode-private-key", settings.auth_supernode_private_key,
            "--port", str(port), "--node-config", node_config(settings)]


def refused_activation(message: str) -> bool:
    """Whether flwr's start-up failure is the SuperLink refusing to activate the node (its error 2004: an unregistered
    key), rather than any other failure to connect (flwr exits 305 for both)."""
    return "[code: 2004]" in message or "Failed to activate SuperNode" in message


def run_supernode(settings: SiteConfig, port: int, poll_interval: float = SUPERNODE_POLL_S, superlink: str | None = None,
                  retry_seconds: float = SERVER_ERROR_RETRY_S) -> int:
    """Run Flower's SuperNode in this process until it stops; returns its exit status (0 only when stopped by
    a signal: Flower's loop never ends on its own, so its end is an error, LOOP_ENDED_EXIT)."""
    import os

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(min(poll_interval, 1.0)))
    _patch_idle_poll(poll_interval)
    _patch_retries(retry_seconds)
    from flwr.supernode import fleet_http_connection as fhc
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # flwr logs its own exit code (305: unknown key) but the process exits 1: keep flwr's code and its message
    flwr_codes: list[int] = []
    flwr_messages: list[str] = []
    real_exit = sci.flwr_exit

    def recording_exit(code, *args, **kwargs):
        flwr_codes.append(int(code))
        flwr_messages.append(str(args[0]) if args else str(kwargs.get("message", "")))
        return real_exit(code, *args, **kwargs)

    sci.flwr_exit = fhc.flwr_exit = recording_exit
    refused: list[str] = []
    _watch_key_refusals(refused)
    _launch_reaping_superexec(sci)
    sys.argv = supernode_argv(settings, port, superlink)
    try:
        flower_supernode()
    except SystemExit as e:
        code = flwr_codes[0] if flwr_codes else (e.code if isinstance(e.code, int) else 1)
        if code == UNREGISTERED_EXIT and not refused_activation(flwr_messages[0] if flwr_messages else ""):
            # 305 is every failure to connect at start (a proxy answering 404, a server erring with 500 past the
            # retries): not the operator's key registration but a server to wait for, so the service restarts it
            sys.stderr.write(f"site {settings.site_name!r}: the connection to the consortium server failed at start "
                             f"(flwr exit {UNREGISTERED_EXIT}: {(flwr_messages[0] if flwr_messages else '')[-300:]}); "
                             f"exiting with code {LOOP_ENDED_EXIT} so that the service manager tries again\n")
            return LOOP_ENDED_EXIT
        if code == UNREGISTERED_EXIT and (clock := clock_refused(settings, refused)):
            sys.stderr.write(clock)  # not the key: every request this machine signs is refused until its clock is set
            return REFUSED_EXIT
        if code == UNREGISTERED_EXIT:
            sys.stderr.write(f"site {settings.site_name!r}: the consortium server refused to activate this site "
                             f"(flwr exit {UNREGISTERED_EXIT}); the usual cause is a key it has not registered: send "
                             f"{settings.auth_supernode_private_key}.pub to the operator, who runs `oncofed consortium "
                             "add-site`, then start again. If it is registered, a SuperNode with this key is already "
                             "connected (this site started on another machine too): stop that one first.\n")
            return REFUSED_EXIT
        if refused:  # the heartbeat's SIGINT after a 401, not a person's Ctrl-C
            # Flower's exit handlers ran, and its exit armed a timer that ends the process with status 0
            sys.stderr.write(key_refused(settings, refused))
            sys.stderr.flush()
            os._exit(REFUSED_EXIT)
        return code
    if refused:
        sys.stderr.write(key_refused(settings, refused))
        _exit_now(REFUSED_EXIT)
        return REFUSED_EXIT
    # flwr's connection context logs the error that ended the loop and swallows it: without an exit here
    # the process hung (non-daemon Runtime API thread) and a kill exited 0, so systemd never restarted it
    sys.stderr.write(f"site {settings.site_name!r}: Flower's SuperNode loop ended on an error (logged above); "
                     f"exiting with code {LOOP_ENDED_EXIT} so that the service manager restarts it\n")
    _exit_now(LOOP_ENDED_EXIT)
    return LOOP_ENDED_EXIT
