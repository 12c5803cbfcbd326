"""This machine's index of its sites' privacy ledgers: which ledger reads which data, and which datasets it holds.

A site's ledger (privacy/ledger.py) accounts every round on the patients it has seen, but only in its own state
directory: a second site directory over the same patients (a re-key, a copy, a second consortium on the same data)
started a second, empty ledger and spent their budget again. The index lets each ledger see the others:

    {"format": "oncofed-ledger-index/1",
     "ledgers": {LEDGER: {"data-path": DATA, "site-dirs": [SITE, ...], "datasets": [FINGERPRINT, ...],
                          "patients": [TAG, ...], "patients-key": KEY_ID, "updated": T}}}

Paths are resolved; datasets are `dataset_fingerprint`s of training splits, never a patient id. A split is not the
patients, though: a copy of the tables trained at another seed, val-fraction or schema is another training split of
mostly the same patients. So a round also claims the site's patients, every patient of its tables whatever the split,
as *tags*: HMAC-SHA256 of each patient id under this index's key (`ledger-index.json.key` beside it, owner-only,
made at the first claim), cut to 64 bits. Without the key a tag says nothing of the patient; with it (the account
that runs the sites, which reads their tables anyway) one can only test an id one already has. Patients shared
with another ledger (any one) are its patients too. Tags made under another key (the key file lost) are not
compared: that ledger's next round tags its patients again. `KEY_ID`: the key's SHA-256, cut, to tell them apart.

Written atomically under an exclusive
lock (the `.lock` file beside it) by `site init` and `site start` (the site's ledger, data path and directory) and by a
deployed site's DP rounds, each of which *claims* the dataset it trains, and its patients, before any spend: refused
when another ledger that still exists holds them (the ledger that spent on them holds them; see `LedgerIndex.claim`),
recorded as this ledger's otherwise.
A ledger no longer at its path (moved with its state directory, deleted) holds nothing: the index never refuses for
a file that is gone.

Where: $ONCOFED_LEDGER_INDEX, else $XDG_STATE_HOME/oncofed/ledger-index.json, else ~/.local/state/oncofed/
ledger-index.json: one per account, the account that runs the site (and its `site init`). Simulations do not use it:
their sites are a researcher's partitions, trained again and again over the same data in fresh state directories.

The index is advisory: it holds no spend, only where the spend is (each ledger holds its own), so no damage to it can
make a ledger lose spend. A damaged index (not JSON, not this format) is therefore not a reason to stop every site of
the machine until someone repairs it by hand: it is set aside (`ledger-index.json.damaged-TIME`, kept for inspection)
and rebuilt from the ledger paths still legible in it, each ledger's spent datasets read from the ledger itself and its
data path from the site.json beside its state directory; every site puts its own entry back at its next start or
round, and the reader is told. An index that cannot be written is refused instead (`site init` writes nothing,
`site start`'s preflight fails, a round is refused before any spend): a claim that is not recorded would let a second
ledger start unseen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared_models.files import atomic_file, exclusive_lock

INDEX_ENV = "ONCOFED_LEDGER_INDEX"
INDEX_FORMAT = "oncofed-ledger-index/1"
INDEX_FILE = "ledger-index.json"
LOCK_WAIT_S = 30.0  # a read-change-write of a small file: a holder for longer is stuck


class LedgerIndexError(ValueError):
    """The index cannot be read or written: names the file and the fix."""


def index_path() -> Path:
    """This account's index: $ONCOFED_LEDGER_INDEX, else under $XDG_STATE_HOME, else under ~/.local/state."""
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV]).expanduser().absolute()
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"  # the XDG rule: relative = unset
    return base / "oncofed" / INDEX_FILE


def _key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _exists(ledger: str) -> bool:
    """Whether a ledger is still at its path; one this account cannot even look for counts as there (it may hold
    spend)."""
    try:
        os.stat(ledger)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


@dataclass(frozen=True)
class OtherLedger:
    """Another ledger of this machine, as the index knows it."""

    ledger: Path
    data_path: str
    site_dirs: tuple[str, ...]

    @property
    def state_dir(self) -> Path:
        return self.ledger.parent

    def describe(self) -> str:
        """'site directory S (ledger L: epsilon E spent in N round(s))', read from the ledger now."""
        where = " and ".join(self.site_dirs) if self.site_dirs else "unknown (not recorded)"
        return f"site directory {where} (ledger {self.ledger}: {spend_of(self.ledger)})"


def spend_of(ledger: Path) -> str:
    """'epsilon E spent in N round(s)', as the ledger's committed rounds recorded it."""
    from privacy.accounting import BudgetError
    from privacy.ledger import read_ledger, recorded_spend

    try:
        spent, committed, pending = recorded_spend(read_ledger(ledger))
    except (BudgetError, TypeError, ValueError):
        return "it cannot be read now, and may hold spend"
    return f"epsilon {spent:.3f} spent in {committed} round(s)" + (
        f" and {pending} begun, counted as spent" if pending else "")


class LedgerIndex:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else index_path()
        self.notes: list[str] = []  # what the person running the command should know (a damaged index set aside)

    # --- what the index says -------------------------------------------------------------------------------------
    def reading(self, data_path: str | Path, ledger: str | Path) -> list[OtherLedger]:
        """The ledgers other than `ledger` that still exist and whose site reads `data_path`."""
        if not str(data_path):
            return []
        data, own = _key(data_path), _key(ledger)
        with self._locked() as ledgers:
            return [_other(k, v) for k, v in sorted(ledgers.items())
                    if k != own and v.get("data-path") == data and _exists(k)]

    def record(self, ledger: str | Path, *, data_path: str | Path = "", site_dir: str | Path | None = None) -> None:
        """This ledger's entry: the data its site reads (as site.json says now) and the site directory using it."""
        with self._locked() as ledgers:
            _update(ledgers, _key(ledger), data_path, site_dir, ())

    def claim(self, ledger: str | Path, dataset: str, fingerprints: set[str], *, patients=(),
              data_path: str | Path = "", site_dir: str | Path | None = None) -> list[OtherLedger]:
        """The ledgers other than `ledger` that still exist and hold any of `fingerprints` (the dataset under every
        hash of its schema) or any of `patients` (the ids of every patient of the site's tables, whatever the split:
        kept only as tags, see the module); when there are none, `dataset` and the tags are recorded as this
        ledger's. An entry of an earlier version has no tags: its fingerprints still hold. A ledger holds patients it
        has spent on, as its own file says (the index may not know a ledger's spend: one that spent before the
        index existed claimed nothing), or one that cannot be read now and that the index says claimed them; a
        ledger that only claimed them, with no spend, holds them against a ledger that has none either (the first
        claim wins; checked and recorded under one lock). So of two ledgers the one with spend on the patients
        holds them, and when both have spend on them both are refused: ledgers cannot be merged."""
        own = _key(ledger)
        with self._locked() as ledgers:
            key_id, tags = self._tags(patients) if patients else ("", set())

            def shares(entry: dict) -> bool:  # patients in common, as the index's tags say
                return bool(tags) and entry.get("patients-key") == key_id and bool(tags & set(entry.get("patients", ())))

            own_spent_on = _spent_datasets(own) or set()
            # a ledger's spend is on the patients it tagged before (its datasets may be other splits of them)
            own_spent = bool(fingerprints & own_spent_on) or (bool(own_spent_on) and shares(ledgers.get(own, {})))
            others = []
            for key, entry in sorted(ledgers.items()):
                if key == own or not _exists(key):
                    continue
                claimed = bool(fingerprints & set(entry.get("datasets", ()))) or shares(entry)
                spent = _spent_datasets(key)
                spent_on = spent is not None and (bool(fingerprints & spent) or (bool(spent) and shares(entry)))
                if (claimed if spent is None else spent_on) or (claimed and not own_spent):
                    others.append(_other(key, entry))
            if not others:
                _update(ledgers, own, data_path, site_dir, (dataset,), key_id, tags)
            return others

    def _tags(self, patients) -> tuple[str, set[str]]:
        """(the key's id, the patients' tags) under this index's key, made now if there is none (under the lock)."""
        path = self.path.with_name(self.path.name + ".key")
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if len(key := bytes.fromhex(path.read_text().strip())) != 32:  # (cut short by a crash)
                    raise ValueError
            else:
                key = secrets.token_bytes(32)
                with os.fdopen(fd, "w") as out:
                    out.write(key.hex() + "\n")
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as e:
            raise self._unwritable(e) from None
        except ValueError:
            raise LedgerIndexError(f"{path}: the key of this machine's index of privacy ledgers is damaged (not 32 bytes in hex); "
                                   "remove it (each site tags its patients again at its next round)") from None
        tags = {hmac.new(key, str(p).encode(), hashlib.sha256).hexdigest()[:16] for p in patients}
        return hashlib.sha256(key).hexdigest()[:16], tags

    # --- the file ----------------------------------------------------------------------------------------------
    def _unwritable(self, e: OSError) -> LedgerIndexError:
        return LedgerIndexError(
            f"{self.path}: this machine's index of privacy ledgers cannot be written ({e.strerror or e}); let the "
            f"account that runs the site write it, or set {INDEX_ENV} to a file it can write (the same file for "
            "`oncofed site init` and the site's service)")

    @contextmanager
    def _locked(self):
        """The index's ledgers, read under its lock; written back (atomically, owner-only) if the block changed them."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fh = exclusive_lock(self.path.with_name(self.path.name + ".lock"), wait=LOCK_WAIT_S)
        except OSError as e:
            raise self._unwritable(e) from None
        if fh is None:
            raise LedgerIndexError(f"{self.path}: this machine's index of privacy ledgers stayed locked for "
                                   f"{LOCK_WAIT_S:g} s by another process (its .lock file); try again, and if it "
                                   "persists find the stuck oncofed process")
        try:
            ledgers, rebuilt = self._load()
            before = None if rebuilt else json.dumps(ledgers, sort_keys=True)  # a rebuilt index is written in any case
            yield ledgers
            if json.dumps(ledgers, sort_keys=True) != before:
                _prune(ledgers)
                try:
                    with atomic_file(self.path, owner_only=True) as out:
                        json.dump({"format": INDEX_FORMAT, "ledgers": ledgers}, out, indent=1, sort_keys=True)
                        out.write("\n")
                except OSError as e:
                    raise self._unwritable(e) from None
        finally:
            fh.close()

    def _load(self) -> tuple[dict, bool]:
        """(the index's ledgers, whether they were rebuilt from a damaged index)."""
        try:
            text = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return {}, False
        except OSError as e:
            raise LedgerIndexError(f"{self.path}: this machine's index of privacy ledgers cannot be read "
                                   f"({e.strerror or e}); let the account that runs the site read it, or set "
                                   f"{INDEX_ENV} to a file it can read and write") from None
        try:
            state = json.loads(text)
            ledgers = state["ledgers"] if state["format"] == INDEX_FORMAT else None
            if isinstance(ledgers, dict) and all(_valid(v) for v in ledgers.values()):
                return ledgers, False
        except (ValueError, TypeError, KeyError):
            pass
        return self._rebuilt(text), True

    def _rebuilt(self, text: str) -> dict:
        """The entries of the ledgers a damaged index still names, the index set aside for inspection."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            raise self._unwritable(e) from None
        ledgers = {}
        for literal in re.findall(r'"((?:[^"\\]|\\.)*)"', text):  # every JSON string still legible
            try:
                path = json.loads(f'"{literal}"')
            except ValueError:
                continue
            if os.path.isabs(path) and _key(path) not in ledgers and (entry := _from_ledger(Path(path))) is not None:
                ledgers[_key(path)] = entry
        self.notes.append(f"{self.path} (this machine's index of privacy ledgers) was damaged: set aside as {aside} and "
                          f"rebuilt from the {len(ledgers)} ledger(s) still named in it; every other site's entry "
                          "returns at its next start or round")
        return ledgers


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("data-path", ""), str)
            and isinstance(entry.get("patients-key", ""), str) and isinstance(entry.get("patients", []), list)
            and all(isinstance(x, str) for k in ("site-dirs", "datasets", "patients") for x in entry.get(k, [])))


def _spent_datasets(ledger: str) -> set[str] | None:
    """The datasets a ledger file has rounds on (begun rounds count as spent); set() when there is no file yet, None
    when it cannot be read now (it may hold spend)."""
    from privacy.accounting import BudgetError
    from privacy.ledger import read_ledger

    if not _exists(ledger):
        return set()
    try:
        return {e["dataset"] for e in read_ledger(ledger)["entries"] if isinstance(e.get("dataset"), str)}
    except BudgetError:
        return None


def _other(ledger: str, entry: dict) -> OtherLedger:
    return OtherLedger(Path(ledger), entry.get("data-path", ""), tuple(entry.get("site-dirs", ())))


def _update(ledgers: dict, ledger: str, data_path, site_dir, datasets, key_id: str = "", tags=frozenset()) -> None:
    old = ledgers.get(ledger, {})
    new = {"data-path": _key(data_path) if str(data_path) else old.get("data-path", ""),
           "site-dirs": sorted(set(old.get("site-dirs", [])) | ({_key(site_dir)} if site_dir else set())),
           "datasets": sorted(set(old.get("datasets", [])) | set(datasets))}
    if old.get("patients-key") and (not tags or old["patients-key"] == key_id):  # every patient it ever held
        new.update({"patients": sorted(set(old.get("patients", [])) | set(tags)), "patients-key": old["patients-key"]})
    elif tags:  # (tags under a lost key are replaced: nothing could compare them)
        new.update({"patients": sorted(tags), "patients-key": key_id})
    if any(new[k] != old.get(k) for k in new):  # unchanged: not written again at every round
        ledgers[ledger] = {**new, "updated": time.time()}


def _prune(ledgers: dict) -> None:
    """Entries of ledgers gone with every site that used them (a ledger not created yet is kept by its site.json)."""
    for ledger, entry in list(ledgers.items()):
        if not _exists(ledger) and not any(_exists(str(Path(s) / "site.json")) for s in entry.get("site-dirs", [])):
            del ledgers[ledger]


def _from_ledger(path: Path) -> dict | None:
    """A rebuilt entry: the datasets the ledger has spent on (a dataset only registered, as by a round refused before
    its spend, is held by no one), and the data path and site of the site.json beside its state directory (where
    `site init` puts it). None: no ledger file there."""
    from privacy.accounting import BudgetError
    from privacy.ledger import LEDGER_FILE, read_ledger
    from privacy.site_config import SiteConfig, SiteConfigError

    if path.name != LEDGER_FILE or not path.is_file():
        return None
    try:
        datasets = sorted({e["dataset"] for e in read_ledger(path)["entries"] if isinstance(e.get("dataset"), str)})
    except BudgetError:
        datasets = []  # a ledger that does not read now still holds its spend: its data path is still checked
    entry = {"data-path": "", "site-dirs": [], "datasets": datasets, "updated": time.time()}
    site = path.parent.parent
    try:
        config = SiteConfig.load(site / "site.json")
        if _key(config.state_dir) == _key(path.parent):
            entry.update({"data-path": _key(config.data_path) if config.data_path else "", "site-dirs": [_key(site)]})
    except (SiteConfigError, OSError):
        pass
    return entry
