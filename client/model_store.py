"""A site's model store: versioned packages of the global model, one directory each.

    MODEL_DIR/v0001/weights.pt     weights stamped with the schema hash (shared_models.weights)
    MODEL_DIR/v0001/schema.json    the schema they were trained under
    MODEL_DIR/v0001/package.json   run, round, metrics, per-site epsilon, SHA-256 of weights.pt
    MODEL_DIR/ACTIVE               the active version's name

A package is written under a temporary name and renamed into place, and ACTIVE is replaced
atomically only after the package verifies: a crash never leaves a half-installed model active.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shared_models.files import fsync_path, sha256_file, sync_directory, write_text_atomic
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.schema import FeatureSchema
from shared_models.site_data import NORMALIZER_FILE
from shared_models.weights import (ArrayCountError, arrays_sha256, load_arrays, load_weights, read_weights,
                                   save_weights, state_arrays)

PACKAGE_FORMAT = "oncofed-model-package/1"
ACTIVE_REREAD_S = 1.0  # ModelStore.active reads ACTIVE again at least this often
FUTURE_SKEW_S = 86400.0  # an active model "finished" later than this after the site's now was dated by a wrong clock


WEIGHTS, VERSION_SCHEMA, PACKAGE = "weights.pt", "schema.json", "package.json"  # a version's own files
NORMALIZER = NORMALIZER_FILE  # in a version's directory: the site's normalisation of the run that made it
SPLIT = "split.json"  # in a version's directory: the run's split key at this site (which patients could have trained)
CHOSEN = "CHOSEN"  # the version the site's admin activated (serve activate): a redelivery does not undo it


_STORE_KEYS = frozenset({"format", "version", "installed", "schema_hash", "arrays_sha256", "weights_sha256",
                         "delivery", "files_sha256"})  # what the store itself writes into package.json; the rest is the delivery's
_MISSING = object()


class ModelStoreError(ValueError):
    """A package that cannot be installed or read; the active model is left as it was."""


class NoModelInstalled(ModelStoreError):
    """The store holds no version yet (a site before its first delivery): the service waits for one."""


class ModelStore:
    def __init__(self, model_dir: str | Path, create: bool = True):
        """`create` False: a reader that writes nothing (`oncofed site status`), the directory perhaps absent."""
        self.root = Path(model_dir)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self._active: tuple | None = None  # (ACTIVE's stat key, when read, its version)

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("v[0-9][0-9][0-9][0-9]") if (p / PACKAGE).exists())

    def active(self) -> str | None:
        return self.active_stamped()[0]

    def active_stamped(self) -> tuple[str | None, tuple | None]:
        """The active version and ACTIVE's (mtime, size, inode) stamp ((None, None) without one). The service asks
        before every request, so ACTIVE is re-read only when its stamp changed, and at least every ACTIVE_REREAD_S
        (two replacements within the file system's timestamp tick could reuse an inode): one stat per call
        otherwise."""
        f = self.root / "ACTIVE"
        try:
            st = f.stat()
        except FileNotFoundError:
            return None, None
        key, now = (st.st_mtime_ns, st.st_size, st.st_ino), time.monotonic()
        if self._active is None or self._active[0] != key or now - self._active[1] > ACTIVE_REREAD_S:
            self._active = (key, now, f.read_text().strip())
        return self._active[2], key

    def package(self, version: str) -> dict:
        return json.loads((self.root / version / PACKAGE).read_text())

    def install(self, schema: FeatureSchema, config: ModelConfig, arrays: list[np.ndarray], info: dict,
                expected_arrays_sha256: str | None = None, normalizer=None, split: dict | None = None) -> str:
        """Write a new version from the model's arrays and activate it; returns the version. The same run's model
        delivered again with the same description (`oncofed deliver` sends the saved package) activates the
        intact version already installed instead of adding a copy."""
        with self._install_lock():  # two deliveries at once (a resumed run's and `oncofed deliver`'s): one at a time
            return self._install(schema, config, arrays, info, expected_arrays_sha256, normalizer, split)

    @contextmanager
    def _install_lock(self):
        with open(self.root / ".install.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _install(self, schema: FeatureSchema, config: ModelConfig, arrays: list[np.ndarray], info: dict,
                 expected_arrays_sha256: str | None, normalizer=None, split: dict | None = None) -> str:
        got = arrays_sha256(arrays)
        if not all(np.isfinite(a).all() for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating)):
            raise ModelStoreError(f"the delivered model (run {info.get('run')}, round {info.get('round')}) has weights "
                                  f"that are not finite (NaN or inf): it would answer every patient with a guess; not "
                                  f"installed, {self.active()} stays active")
        if expected_arrays_sha256 is not None and got != expected_arrays_sha256:
            raise ModelStoreError(f"received model hash {got[:12]}... differs from the announced "
                                  f"{expected_arrays_sha256[:12]}...: not installed, {self.active()} stays active")
        self._not_older(info)
        if info.get("run") and (same := self._installed(got, info)) is not None:
            # this model again (`oncofed deliver`): active again, e.g. after an install a crash cut short before its
            # activation; not over a version the site's admin chose since (a rollback away from it stays)
            if (chosen := self.chosen()) is None or chosen == same:
                self.activate(same)
            return same
        model = MultiModalTransformer(schema, config)
        try:
            load_arrays(model, arrays)
        except ArrayCountError as e:
            raise ModelStoreError(f"{e}: not installed") from None
        existing = self.versions()
        version = f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"
        tmp = self.root / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            return self._write_version(tmp, version, schema, model, got, info, normalizer, split)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: no half-written copy left taking its space
            raise

    def _write_version(self, tmp: Path, version: str, schema: FeatureSchema, model, got: str, info: dict,
                       normalizer, split: dict | None) -> str:
        tmp.mkdir()
        save_weights(model, tmp / WEIGHTS, extra={k: info[k] for k in ("run", "round") if k in info})
        schema.save(tmp / VERSION_SCHEMA)
        if callable(normalizer):  # made only for a version written: a redelivery does not read the site's tables again
            normalizer = normalizer()
        if normalizer is not None:  # the statistics this site's patients were normalised with in the run: the model's
            normalizer.save(tmp / NORMALIZER)  # own, whatever later runs write to the site's state
        # which patients the run may have trained on, for calibration to leave out; only where the site prepared its
        # data for the run (a site whose tables do not validate trained on none of them)
        if split is not None and normalizer is not None:
            (tmp / SPLIT).write_text(json.dumps(split))
        # the site's own files kept with the version (its normalisation, its split): each answer depends on them.
        # Unsigned (the server never saw them): the hashes catch accidents, not a writer of model-dir, who can rewrite
        # them too; that needs model-dir writable by the service account only (docs/hospital-guide.md)
        kept = {name: sha256_file(tmp / name) for name in (NORMALIZER, SPLIT) if (tmp / name).is_file()}
        package = {"format": PACKAGE_FORMAT, "version": version, "installed": time.time(),
                   "schema_hash": schema.content_hash(), "arrays_sha256": got,
                   "weights_sha256": sha256_file(tmp / WEIGHTS), **({"files_sha256": kept} if kept else {}),
                   **info, "delivery": info}  # verbatim, as signed by the server: re-verifiable later
        (tmp / PACKAGE).write_text(json.dumps(package, indent=1))
        sync_directory(tmp)  # on disk before its name is, and before the active pointer names it
        os.replace(tmp, self.root / version)
        fsync_path(self.root)
        self.activate(version)
        return version

    def _not_older(self, info: dict) -> None:
        """Refuses a delivery whose run finished before the active model's: re-delivering an earlier run must not
        roll a site back without its say (its admin can activate any installed version: /v1/models/activate)."""
        active = self.active()
        if active is None:
            return
        try:
            package = self.package(active)
        except (OSError, ValueError):
            return  # an unreadable active package: the new model is the better one to serve
        theirs = package.get("delivery", {}).get("finished")
        if not isinstance(theirs, (int, float)):
            return  # an active model without a date (before 2026-12-05): any delivery may replace it
        now = time.time()
        mine = info.get("finished")
        if theirs > now + FUTURE_SKEW_S and not (isinstance(mine, (int, float)) and mine > now + FUTURE_SKEW_S):
            # dated by a server clock that was far ahead: every later model, dated right, would look older than it
            # and no delivery could ever replace it (nor could the site activate a model it never installed). Both
            # in the future: this site's clock is behind, and the dates still order the two. A delivery passing the
            # active one's date must still be newer than every other installed model not itself dated far ahead (with
            # this site's clock behind, an earlier run delivered again is not); an undated one is installed
            others = [d for v in self.versions() if v != active
                      and isinstance(d := self._finished(v), (int, float)) and d <= now + FUTURE_SKEW_S]
            if not isinstance(mine, (int, float)) or all(mine > d for d in others):
                return
            raise ModelStoreError(
                f"the delivered model (run {info.get('run')}) finished training before another installed model: not "
                f"installed, {active} stays active; to go back to an earlier model, the site activates it itself")
        if not isinstance(mine, (int, float)):  # cannot be ordered against the active one
            raise ModelStoreError(
                f"the delivered model (run {info.get('run')}) carries no finish time and the active {active} (run "
                f"{package.get('run')}) does: it may be an earlier run, so it is not installed and {active} stays "
                "active; the operator sends it again with OncoFed's `oncofed deliver`, which dates it")
        if mine < theirs:
            raise ModelStoreError(
                f"the delivered model (run {info.get('run')}) finished training before the active {active} (run "
                f"{package.get('run')}): not installed, {active} stays active; to go back to an earlier model, the "
                "site activates it itself")

    def _finished(self, version: str) -> float | None:
        """When the run of an installed version finished (its delivery's date), None if unknown or unreadable."""
        try:
            return self.package(version).get("delivery", {}).get("finished")
        except (OSError, ValueError):
            return None

    def _installed(self, arrays_sha: str, info: dict) -> str | None:
        """The newest intact version holding these arrays under the same delivery description (signature aside:
        each signing draws a new one), if any."""
        from privacy.signing import SIGNATURE_KEY

        described = {k: v for k, v in info.items() if k != SIGNATURE_KEY}
        for version in reversed(self.versions()):
            try:
                package = self.package(version)
                delivered = {k: v for k, v in package.get("delivery", {}).items() if k != SIGNATURE_KEY}
                if package.get("arrays_sha256") == arrays_sha and delivered == described:
                    self.verify(version)
                    return version
            except (ModelStoreError, OSError, ValueError):
                continue  # damaged: a fresh copy is installed
        return None

    def verify(self, version: str, signing_public_key=None) -> dict:
        """The package, after checking its weights file against its SHA-256 and, given the consortium's
        model-signing public key, the server's signature on what was delivered."""
        pkg_dir = self.root / version
        try:
            package = self.package(version)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelStoreError(f"{pkg_dir}: unreadable package ({e})") from None
        actual = sha256_file(pkg_dir / WEIGHTS)
        if actual != package.get("weights_sha256"):
            raise ModelStoreError(f"{pkg_dir}/weights.pt: SHA-256 {actual[:12]}... does not match the package's "
                                  f"{str(package.get('weights_sha256'))[:12]}...: the file was altered")
        for name, expected in (package.get("files_sha256") or {}).items():  # (a version installed before: none)
            found = sha256_file(pkg_dir / name) if (pkg_dir / name).is_file() else "missing"
            if found != expected:
                raise ModelStoreError(f"{pkg_dir}/{name}: " + ("missing" if found == "missing" else f"SHA-256 "
                                      f"{found[:12]}... does not match the package's {str(expected)[:12]}...")
                                      + ": the file was altered (every answer of this version depends on it)")
        try:
            installed = FeatureSchema.load(pkg_dir / VERSION_SCHEMA)
        except Exception as e:  # noqa: BLE001 - any unreadable schema: the package cannot be served
            raise ModelStoreError(f"{pkg_dir}/schema.json: unreadable ({e})") from None
        for source, expected in ((PACKAGE, package.get("schema_hash")),
                                 ("the delivery the server signed", package.get("delivery", {}).get("schema_hash"))):
            if expected is not None and not installed.matches(expected):
                # the schema names the classes: one altered after delivery answers with the wrong names
                raise ModelStoreError(f"{pkg_dir}/schema.json: content hash {installed.content_hash()[:12]}... is "
                                      f"not the schema of {source} ({str(expected)[:12]}...): the file was altered")
        from privacy.signing import SIGNATURE_KEY

        delivery = package.get("delivery")
        # the service, the audit and the site's tools read the top-level copies: they must be what was delivered,
        # none removed (a DP label deleted would skip the audit's bound) and none added beside it
        altered = [] if delivery is None else sorted(
            {k for k, v in delivery.items() if k != SIGNATURE_KEY and package.get(k, _MISSING) != v}
            | {k for k in package if k not in delivery and k not in _STORE_KEYS})
        if altered:
            raise ModelStoreError(f"{pkg_dir}/package.json: {', '.join(altered)} differ from the delivery the server "
                                  "signed (its 'delivery' entry: changed, removed or added): the file was altered")
        if signing_public_key is not None:
            from privacy.signing import SignatureError
            from privacy.signing import verify as verify_signature

            try:
                verify_signature(package.get("delivery", {}), signing_public_key)
            except SignatureError as e:
                raise ModelStoreError(f"{pkg_dir}: {e}") from None
            model = load_weights(pkg_dir / WEIGHTS, FeatureSchema.load(pkg_dir / VERSION_SCHEMA))
            if arrays_sha256(state_arrays(model)) != package["delivery"].get("arrays_sha256"):
                raise ModelStoreError(f"{pkg_dir}: the installed weights are not the ones the server signed")
        signed = (delivery or {}).get("architecture")
        if signed is not None:
            # the weights file builds the model from its own copy of the settings: one edited after delivery (a
            # gain, the number of heads) changes every answer without changing an array
            found = json.loads(json.dumps(read_weights(pkg_dir / WEIGHTS).get("config")))  # tuples as lists
            if found != signed:
                changed = sorted(k for k in set(signed) | set(found or {}) if (found or {}).get(k) != signed.get(k))
                raise ModelStoreError(f"{pkg_dir}/weights.pt: its architecture ({', '.join(changed)}) is not the one "
                                      "the server signed: the file was altered")
        return package

    def activate(self, version: str, chosen: bool = False) -> None:
        """Make `version` the active one. `chosen`: by the site's admin (`serve activate`, /v1/models/activate), a
        choice a later delivery of a model already installed does not undo; a new model installed does."""
        self.verify(version)
        write_text_atomic(self.root / "ACTIVE", version + "\n")
        if chosen:
            write_text_atomic(self.root / CHOSEN, version + "\n")
        else:
            (self.root / CHOSEN).unlink(missing_ok=True)

    def chosen(self) -> str | None:
        """The version the site's admin activated, while it is still the active one."""
        try:
            version = (self.root / CHOSEN).read_text().strip()
        except OSError:
            return None
        return version if version == self.active() else None
