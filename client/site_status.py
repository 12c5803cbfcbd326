"""`oncofed site status SITE_DIR`: what a site holds, read without starting or stopping it.

Read-only, and safe while the site runs: no file is written or created, and no lock is taken (the SuperNode's
`state/supernode.lock`, the ledger's and the audit log's locks would make a round or a start wait, or fail). The
ledger is read as it is on disk (its writes are atomic renames: one whole version or the other), the spend as its
last committed round recorded it (privacy.ledger.recorded_spend, no accountant run).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from privacy.audit import AUDIT_FILE
from privacy.site_config import SiteConfig


def _when(seconds) -> str:
    return (datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
            if isinstance(seconds, (int, float)) else "?")


def supernode_line(state_dir: Path) -> str:
    """Whether `oncofed site start` runs: the pid its lock file names, if that process is alive (the lock itself is
    not tried: holding it a moment would refuse a start at that moment)."""
    from client.supernode import SITE_LOCK

    try:
        pid = int((state_dir / SITE_LOCK).read_text().strip())
    except (OSError, ValueError):
        return "SuperNode: not running (never started here, or no pid recorded)"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"SuperNode: not running (pid {pid} of its last start has ended)"
    running = "oncofed" in cmdline or "supernode" in cmdline
    return f"SuperNode: running (pid {pid})" if running else \
        f"SuperNode: not running (pid {pid} of its last start is now another process)"


def privacy_lines(settings: SiteConfig) -> list[str]:
    """The budget, the epsilon spent and left, and each run's rounds, from the ledger."""
    from privacy.accounting import BudgetError
    from privacy.ledger import LEDGER_FILE, read_ledger, recorded_spend

    ledger = Path(settings.state_dir) / LEDGER_FILE
    budget = settings.privacy_budget
    said = (f"privacy budget: epsilon {budget:g}" if budget is not None else
            "privacy budget: not set (privacy-budget in site.json): the site trains no DP run")
    if not ledger.exists():
        return [said, f"privacy ledger {ledger}: none yet (the first DP round creates it): epsilon 0 spent"]
    try:
        state = read_ledger(ledger)
        spent, committed, pending = recorded_spend(state)
    except (BudgetError, TypeError, ValueError) as e:
        return [said, f"privacy ledger {ledger}: {str(e).removeprefix(f'{ledger}: ')}"]
    lines = [f"{said} at delta {state.get('delta', settings.privacy_delta)}",
             f"epsilon spent: {spent:.3f}, over the committed rounds ({ledger})"]
    if budget is not None:
        lines.append(f"epsilon left: {max(budget - spent, 0.0):.3f}")
    if pending:
        lines.append(f"  and {pending} round(s) begun and not finished (a crash or a refusal): counted as spent, "
                     "not in the figure above")
    runs: dict[str, dict] = {}
    for key, plan in state.get("runs", {}).items():
        run = key.split(":", 1)[-1]
        runs.setdefault(run, {"plan": plan, "committed": 0, "begun": 0})
    for e in state["entries"]:
        r = runs.setdefault(str(e.get("run_id")), {"plan": {}, "committed": 0, "begun": 0})
        r["committed" if e.get("status") == "committed" else "begun"] += 1
    lines.append(f"runs: {len(runs)} recorded, {committed} round(s) committed")
    for run, r in sorted(runs.items(), key=lambda kv: kv[1]["plan"].get("started") or 0):
        plan = r["plan"]
        planned = (f"epsilon {plan['epsilon']:g} over {plan.get('num_rounds')} round(s), started "
                   f"{_when(plan.get('started'))}" if isinstance(plan.get("epsilon"), (int, float)) else "no plan")
        lines.append(f"  {run}: {r['committed']} round(s) committed" + (f", {r['begun']} begun" if r["begun"] else "")
                     + f" ({planned})")
    return lines


def model_lines(model_dir: Path) -> list[str]:
    """The installed versions and the active one, read from the store's files (a store that creates nothing)."""
    from client.model_store import ModelStore

    store = ModelStore(model_dir, create=False)
    versions = store.versions()
    if not versions:
        return [f"models: none installed in {model_dir} (the global model arrives after a federated run)"]
    active = store.active()
    lines = [f"models: {len(versions)} installed in {model_dir}; active: "
             + (f"{active}{' (chosen by the site)' if store.chosen() else ''}" if active else "none (no ACTIVE file)")]
    for v in versions:
        try:
            package = store.package(v)
        except (OSError, ValueError):
            lines.append(f"  {v}: package.json unreadable")
            continue
        lines.append(f"  {v}{' *' if v == active else ''}: run {package.get('run')}, round {package.get('round')}, "
                     f"installed {_when(package.get('installed'))}")
    return lines


def audit_line(path: Path) -> str:
    """The audit log's last entry: its time and event (only the log's end is read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read().splitlines()
    except FileNotFoundError:
        return f"audit log {path}: no entry yet"
    except OSError as e:
        return f"audit log {path}: unreadable ({e.strerror})"
    for line in reversed(tail):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        return f"audit log {path}: last entry {entry.get('time')} ({entry.get('event')}, number {entry.get('seq')})"
    return f"audit log {path}: no complete entry at its end"


def site_status(site_dir: Path, settings: SiteConfig) -> str:
    state = Path(settings.state_dir)
    lines = [f"site {settings.site_name!r} of consortium {settings.consortium!r} ({site_dir / 'site.json'}; server "
             f"{settings.superlink or 'not set'})", supernode_line(state), *privacy_lines(settings),
             *model_lines(Path(settings.model_dir)), audit_line(state / AUDIT_FILE)]
    return "\n".join(lines)
