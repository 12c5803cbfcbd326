"""Atomic server checkpoints and the frozen run: a crash at any moment leaves the previous checkpoint intact.

`run.json` freezes a run when it starts (before any site trains): its run key and its whole run
config. Resuming reloads both and refuses any change, so a resumed run is the run the sites agreed
to (same rounds, same epsilon, same recipe) and the sites recognise it by its key.

A checkpoint is a directory `round-NNNN/` (global weights, strategy state, round, run config,
per-site epsilon) written under a temporary name and renamed into place; `latest.json` is then
replaced atomically. Resuming reads `latest.json`, so a half-written directory is never used. Only the
newest `keep-checkpoints` rounds stay (a 250-round run would otherwise keep 1.3 GB at 5 MB a round).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_models.files import exclusive_lock, sync_directory, write_failure, write_json_atomic  # noqa: F401 (server.app imports it from here)
from server.run_files import METRICS, RUN_FILE, metrics_lines


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for resuming; names the directory and the fix."""


@dataclass
class Checkpoint:
    round: int
    weights: list[np.ndarray]
    strategy_state: dict[str, np.ndarray]
    meta: dict


def newest_rounds(lines: list[dict]) -> dict[int, dict]:
    """Each round's newest metrics.jsonl line: a round run again after a resume from an older checkpoint (the
    newest moved aside, damaged) is what that round's record is now, not what its earlier attempt recorded."""
    return {r["round"]: r for r in lines if isinstance(r.get("round"), int)}


def rounds_updated(lines: list[dict], before: int | None = None) -> int:
    """How many rounds (before round `before`, if given: the rounds a resumed run's checkpoint holds) updated the
    global model, by each round's newest line (a refused or abandoned round ends without changing it)."""
    return sum(r.get("status") == "updated" for rnd, r in newest_rounds(lines).items() if before is None or rnd < before)


def model_updated(lines: list[dict], before: int | None = None) -> bool:
    """Whether a round updated the global model (see rounds_updated): False, it is still the untrained initial one."""
    return rounds_updated(lines, before) > 0


def refusals(lines: list[dict], names: dict | None = None) -> list[tuple[list[str], str]]:
    """The distinct refusal reasons of these rounds (metrics.jsonl lines), each once with the sites that gave it, in
    order of first appearance: three sites out of budget are one reason, not three copies of it. A site is named by
    its register entry (`names`, {node id: name}) or by the "NAME: " its reason starts with."""
    names = {str(k): v for k, v in (names or {}).items()}
    known = set(names.values())
    by_reason: dict[str, list[str]] = {}
    for r in lines:
        for x in r.get("refused") or []:
            text = str(x.get("reason", "")) if isinstance(x, dict) else str(x)
            site = names.get(str(x.get("node"))) if isinstance(x, dict) else None
            head, sep, rest = text.partition(": ")
            if sep and (head == site or (site is None and head in known)):
                site, text = head, rest
            sites = by_reason.setdefault(text, [])
            if site and site not in sites:
                sites.append(site)
    return [(sites, reason) for reason, sites in by_reason.items()]


def said_refusals(found: list[tuple[list[str], str]], most: int = 3, short: bool = False) -> str:
    """refusals() as words: "Hosp A, Hosp B: REASON; ..."; `short`, each reason cut at its first clause (what it
    is, not the whole of what to do about it)."""
    def cut(reason: str) -> str:
        if not short:
            return reason
        depth = 0
        for i, ch in enumerate(reason):  # the first ": " outside brackets ends the first clause
            depth += (ch in "([") - (ch in ")]")
            if depth <= 0 and reason.startswith(": ", i):
                reason = reason[:i]
                break
        return reason if len(reason) <= 160 else reason[:157] + "..."

    said = [f"{', '.join(sites)}: {cut(reason)}" if sites else cut(reason) for sites, reason in found[:most]]
    return "; ".join(said) + (f" (and {len(found) - most} more)" if len(found) > most else "")


def why_no_update(lines: list[dict], most: int = 3, names: dict | None = None, short: bool = False) -> str:
    """Why no round updated the global model, round by round (rounds in a row with the same words together): the
    server's reason for each, and the sites' refusals (each distinct reason once, with the sites that gave it:
    refusals) and failures (at most `most` of each kind; metrics.jsonl keeps them all). `short`: the refusals alone
    when there are any (they are why: the server's own reason then only says that no site was left), each cut to
    its first clause."""

    def some(kind: str, items: list[str]) -> str:
        items = list(dict.fromkeys(items))
        return f"{kind}: {'; '.join(items[:most])}" + (f" (and {len(items) - most} more)" if len(items) > most else "")

    said: list[tuple[int, int, str]] = []  # (first round, last round, why)
    for rnd, r in sorted(newest_rounds(lines).items()):
        why = r.get("reason") or ("no site contributed" if r.get("status") == "no-update" else
                                  f"status {r.get('status') or 'unknown'}")
        if found := refusals([r], names):
            why = (f"refused by {said_refusals(found, most, short)}" if short else
                   f"{why} (refused: {said_refusals(found, most)})")
        if failed := [str(x) for x in r.get("failures") or []]:
            why += f" ({some('failed', failed)})"
        if r.get("dropped"):
            why += f" (no reply from nodes {', '.join(map(str, r['dropped']))})"
        if said and said[-1][2] == why and said[-1][1] == rnd - 1:
            said[-1] = (said[-1][0], rnd, why)
        else:
            said.append((rnd, rnd, why))
    return "; ".join(f"round {a}: {w}" if a == b else f"rounds {a}-{b}: {w}" for a, b, w in said) or "no round ran"


def round_outcome(run_dir: Path, rnd: int) -> dict | None:
    """{"round", "status"[, "reason", "received"]} of round `rnd` when it is the last line of RUN_DIR/metrics.jsonl (None
    otherwise): what the sites are told of a round whose next message (the next round, or the model delivery
    after the last) may come from another server process."""
    lines = metrics_lines(run_dir / METRICS) if rnd >= 1 else []
    last = lines[-1] if lines else {}
    if last.get("round") != rnd or not last.get("status"):
        return None
    return {"round": rnd, "status": last["status"], **({"reason": last["reason"]} if last.get("reason") else {}),
            **({"received": True} if last.get("received") else {})}


def resume_command(run_dir: Path, registry: Path | None) -> str:
    """How the run in `run_dir` goes on after it stopped: a consortium's run (its run config's site-registry is
    CONSORTIUM/consortium.json) by `oncofed run --resume`; a simulation (no register) by running it again, as
    `oncofed simulate` has no --resume (it clears its server output and starts over)."""
    if registry is None:
        return ("run the simulation again (`oncofed simulate` has no --resume: it starts over; `oncofed experiment` "
                "reruns the unfinished cell)")
    return f"continue the run with `oncofed run {registry.parent} --name {run_dir.name} --resume`"


def save_checkpoint(root: Path, rnd: int, weights: list[np.ndarray], strategy_state: dict[str, np.ndarray],
                    meta: dict, keep: int = 0, resume: str = "continue the run") -> Path:
    """Writes round `rnd`'s checkpoint, then (keep > 0) removes all but the `keep` newest rounds. `resume` (from
    resume_command): what a failure's message tells to do once the disk is fixed."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{rnd:04d}"
    tmp = root / f".tmp-round-{rnd:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        np.savez(tmp / "weights.npz", *weights)
        np.savez(tmp / "strategy_state.npz", **strategy_state)
        write_json_atomic(tmp / "meta.json", {"round": rnd, **meta})
        sync_directory(tmp)  # the arrays on disk before latest.json, fsynced, can name them
        if final.exists():  # a resumed run re-running this round replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(root / "latest.json", {"round": rnd, "path": final.name})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"round {rnd}'s checkpoint could not be written in {root} ({e.strerror or e}): "
                      f"{write_failure(e, root)}, then {resume}; the rounds checkpointed before are kept") from None
    if keep > 0:
        prune_checkpoints(root, keep, final.name)
    return final


def prune_checkpoints(root: Path, keep: int, latest: str) -> list[str]:
    """Removes round directories beyond the `keep` newest (never `latest`, the one resuming reads). Runs only
    after latest.json points at the new round, so a crash here leaves extra directories, never too few."""
    rounds = _round_dirs(root)  # by number: round-10000 comes after round-9999
    removed = [d.name for d in rounds[:-keep] if d.name != latest]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    return removed


def _round_dirs(root: Path) -> list[Path]:
    """The complete round checkpoints (a round-NNNN directory is renamed into place only once fsynced), by number."""
    return sorted((d for d in root.glob("round-[0-9]*") if d.is_dir() and d.name[6:].isdigit()),
                  key=lambda d: int(d.name[6:]))


def has_checkpoint(root: Path) -> bool:
    """What `load_latest` (and so a resumed ServerApp) will find something in."""
    return (root / "latest.json").exists() or bool(_round_dirs(root))


def load_latest(root: Path) -> Checkpoint | None:
    """The checkpoint latest.json names; without a readable latest.json, or when the directory it names is gone (moved
    aside by the operator), the newest round directory: never the run's start while a round's checkpoint exists
    (restarting from round 1 would ask the sites again for rounds they released, under another sum)."""
    pointer, d = root / "latest.json", None
    try:
        d = root / json.loads(pointer.read_text())["path"]
    except FileNotFoundError:
        pass
    except (OSError, KeyError, TypeError, ValueError) as e:
        logging.getLogger(__name__).warning("%s unreadable (%s): resuming from the newest round directory", pointer, e)
    if d is None or not d.is_dir():
        rounds = _round_dirs(root)
        if not rounds:
            return None
        if d is not None:
            logging.getLogger(__name__).warning("%s names %s, which is gone: resuming from %s", pointer, d.name,
                                                rounds[-1].name)
        d = rounds[-1]
    try:
        with np.load(d / "weights.npz") as z:
            weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        with np.load(d / "strategy_state.npz") as z:
            state = {k: z[k] for k in z.files}
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{d}: checkpoint unreadable ({type(e).__name__}: {e}); restore it from a backup, or move the directory "
            f"out of {root} to resume from the round before it (the sites resend the later rounds' updates from their "
            "release copies, spending nothing again). Do not delete latest.json alone: the newest round directory "
            "is read in its place") from None
    return Checkpoint(round=int(meta["round"]), weights=weights, strategy_state=state, meta=meta)


RUN_LOCK = ".serverapp.lock"


def hold_run_lock(out: Path, wait: float = 0.0):
    """An exclusive lock on the run directory, held for the ServerApp's life, so that two ServerApps never write
    one run's run.json, checkpoints and audit log. `wait`: seconds to wait for a previous ServerApp being
    stopped (a resume, a delivery). Returns the open lock file: keep a reference to it."""
    fh = exclusive_lock(out / RUN_LOCK, wait)
    if fh is None:
        raise CheckpointError(f"{out}: another ServerApp is running this run (two `oncofed run` of one name, or a "
                              "delivery during training); nothing was started. `oncofed runs list` shows it; let it "
                              "finish, or `oncofed runs stop` it first")
    return fh


UNFROZEN = ("resume", "keep-checkpoints")  # the run-config keys a resumed run may change


def freeze_run(out: Path, run_key: str, run_config: dict) -> None:
    """Record the run before round 1: a crash at any later moment can be resumed as exactly this run. Beside the
    request, its values as this code resolves them ("auto": the recipe's learning rate, batch and clipping bound),
    so that a resume under code whose recipes differ is refused instead of training on with them."""
    out.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in sorted(run_config.items()) if k not in UNFROZEN}
    # the keys a resume may change, as the run started: a resume without them keeps them (keep-checkpoints = 0 must
    # not become the project default 3 and prune the rounds the operator chose to keep)
    started = {k: run_config[k] for k in UNFROZEN if k in run_config and k != "resume"}
    write_json_atomic(out / RUN_FILE, {"run_key": run_key, "run_config": kept, "resolved": _resolved(kept),
                                       "unfrozen": started})


def _resolved(run_config: dict) -> dict:
    from privacy.run_config import load_run_config

    # as a resume: the checks only a new run gets (e.g. lr given without max-grad-norm under DP-SGD) would refuse a
    # run started before them, which may resume as it trained; a new run's request passed them before it was frozen
    flat = load_run_config({**{k: v for k, v in run_config.items() if k not in UNFROZEN}, "resume": True},
                           source="run config").flat()
    return json.loads(json.dumps({k: v for k, v in flat.items() if k != "resume"}))


def frozen_run(out: Path) -> dict | None:
    """{"run_key", "run_config"} of the run in `out`, or None if no run was started there."""
    f = out / RUN_FILE
    if not f.exists():
        return None
    try:
        frozen = json.loads(f.read_text())
        # a run started before a key existed trained with the value that key now needs to say so: it resumes with it.
        # Which keys its code knew: `resolved` lists every one (freeze_run), the request only those it was given
        known = frozen["resolved"] if "resolved" in frozen else frozen["run_config"]
        added = {k: v for k, v in ADDED_KEYS.items() if k not in known}
        return {"run_key": str(frozen["run_key"]), "run_config": {**dict(frozen["run_config"]), **added},
                "resolved": {**dict(frozen["resolved"]), **added} if "resolved" in frozen else None,  # None: a run.json before
                "unfrozen": dict(frozen.get("unfrozen", {}))}
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); the run cannot be resumed as it was started: start a new "
                              "run under another name") from None


ADDED_KEYS = {"modality-dropout": 0.0, "site-registry": "", "fusion-blocks": 2}
"""Run-config keys added after runs could have started, and the value that trains as those runs did: frozen_run
gives such a run's config with it, so `oncofed run --resume` continues it as it trained ("auto" would now resolve
otherwise: fusion-blocks, 2 in every model before it existed, is 1 in dp-mode "site")."""


def run_config_changes(frozen: dict, requested: dict, resolved: dict | None = None) -> list[str]:
    """The keys a resume request changes, as 'key: frozen -> requested', compared as resolved: against the values
    frozen at the start (`resolved`, from run.json) when there are some, so that "auto" resolved otherwise by the
    code that resumes (another recipe) counts as a change; else as this code parses both."""
    a = resolved if resolved is not None else _resolved(frozen)
    b = _resolved(requested)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
