"""Run a simulated federation through Flower's simulation engine, end to end, and report it.

    partition (if needed) -> start a private local SuperLink -> `flwr run <project> local` ->
    stop the SuperLink -> evaluate the delivered global model on patients of held-out sites

The SuperLink and `flwr run` are started and stopped by server/processes.py (start_local_superlink:
its own FLWR_HOME and ports, always stopped afterwards, never clashing with another user's).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from server.processes import LaunchError, run_flwr, start_local_superlink
from server.submit import is_duplicate_log_line
from shared_models.run_config import FederationSection, flwr_overrides
from server.run_files import FLWR_LOG, RESULT, RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "simulations" / "data" / "tcga_pancan33"
PANCAN_SCHEMA = ROOT / "simulations" / "schemas" / "tcga_pancan33.json"


# run-config keys a simulated federation sets itself (federation_config) or that only an operator's deployment uses,
# with where their value comes from: `oncofed simulate --set` and an experiment's [run] refuse them by name (given,
# they overrode the simulation's own and its server app ended without a result, the cause only in Flower's log)
SIMULATION_SETS = {
    "base-dir": "the checkout the simulation runs from", "data-root": "the partition's site directories",
    "site-state-root": "the simulation's working directory", "output-dir": "the simulation's working directory",
    "sites": "the partition's sites", "eval-data": "the partition's held-out patients",
    "signing-key": "the simulation's own key in its keys/", "signing-public-key": "the simulation's own key in its keys/",
    "resume": "an operator's key: a simulated run is not resumed, a stopped one starts again",
    "deliver-only": "an operator's key: a simulated run trains and delivers in one go"}


class SimulationError(RuntimeError):
    """A simulated run that could not complete; the message says where its logs are."""


def ensure_partition(data_root: Path, *, by: str = "center8", seed: int = 0, replace: bool = False) -> Path:
    """The vendored pan-cancer cohort cut into its center8 hospitals, with held-out tss patients.

    An existing partition is reused if it was drawn with this `by` and `seed`; another one is replaced when
    `replace`, else refused (SimulationError). The partition is written beside `data_root` and renamed into
    place when complete, so an interrupted one never stands in for a partition."""

    manifest = data_root / "manifest.json"
    if manifest.exists():
        try:
            drawn = json.loads(manifest.read_text())
            same = drawn.get("seed") == seed and drawn.get("method", {}).get("by") == by
        except (OSError, ValueError):
            drawn, same = {}, False
        if same:
            return data_root
        if not replace:
            raise SimulationError(f"{data_root} holds a partition drawn with seed {drawn.get('seed')!r}, not {seed}: "
                                  "use another --out, or let --fresh replace it")
    elif data_root.exists() and any(data_root.iterdir()):
        raise SimulationError(f"{data_root} exists but holds no complete partition (no manifest.json): delete it, "
                              "or use another --out")
    from shared_models.schema import FeatureSchema
    from simulations.partition import partition_cohort

    partial = data_root.with_name(data_root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # this function's own, from an interrupted run
    partition_cohort(VENDORED, FeatureSchema.load(PANCAN_SCHEMA), partial, by=by, seed=seed, holdout_column="tss")
    shutil.rmtree(data_root, ignore_errors=True)
    partial.rename(data_root)
    return data_root


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived (terminate_as_exit): a command may say what was kept, as it does for Ctrl-C."""


def terminate_as_exit():
    """SIGTERM and SIGHUP (`timeout`, systemd, a closed terminal) raise SystemExit (Terminated) in the main thread,
    so that `finally` blocks stop the local SuperLink and its apps as Ctrl-C does (Python's default ends the process
    without them)."""
    import signal

    def stop(signum, _frame):
        raise Terminated(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


SETTING_KEYS = {"rounds": "num-rounds", "dp": "dp", "epsilon": "epsilon", "secagg": "secagg", "strategy": "strategy",
                "local_epochs": "local-epochs", "lr": "lr", "batch_size": "batch-size"}
"""federation_config's settings (`oncofed simulate`'s options of the same names) -> the run-config keys they set;
`extra` (--set) is applied after them, so the CLI refuses a key given both ways."""


def federation_config(out: Path, sites: Path, n_sites: int, *, seed: int, eval_data: Path | None = None,
                      schema: Path | None = None, extra: dict | None = None, **settings) -> dict:
    """The run config of a simulated federation whose working files live under `out`.

    `settings`: the options of SETTING_KEYS (rounds, dp, epsilon, ...). A setting left None is the run config's
    default (`flwr run` merges these over [tool.flwr.app.config]).
    Learning rate and batch are the run config's recipe for `dp` (`lr = "auto"`, `batch-size = "auto"`:
    shared_models.run_config.RECIPES, the same a deployment gets) unless given. The consortium's
    model-signing key is generated once in out/keys: the server signs the final model and every site
    verifies it before installing it.
    """
    from privacy.signing import generate_signing_key

    keys = out / "keys"
    if not (keys / "signing.key").exists():
        generate_signing_key(keys / "signing.key", keys / "signing.pub")
    cfg = {"base-dir": str(ROOT), "data-root": str(sites), "site-state-root": str(out / "state"),
           "output-dir": str(out / "server"), "sites": n_sites, "seed": seed,
           "round-timeout": 900.0, "signing-key": str(keys / "signing.key"),
           "signing-public-key": str(keys / "signing.pub")}
    if n_sites < FederationSection.model_fields["min_sites"].default:  # one site: a round of one
        cfg["min-sites"] = n_sites
    if unknown := sorted(set(settings) - set(SETTING_KEYS)):
        raise TypeError(f"federation_config: {', '.join(unknown)} not among its settings ({', '.join(SETTING_KEYS)})")
    cfg.update({SETTING_KEYS[name]: value for name, value in settings.items() if value is not None})
    if schema is not None:
        cfg["schema"] = str(schema)
    if eval_data is not None:
        cfg["eval-data"] = str(eval_data)
    cfg.update(extra or {})
    return cfg


def run_federation(work: Path, run_config: dict, n_sites: int, stream=sys.stdout) -> dict:
    """`flwr run` the project as a simulated federation of n_sites; returns the server's result.json."""
    try:
        link = start_local_superlink(work)
    except LaunchError as e:
        raise SimulationError(str(e)) from None

    def show(line: str) -> None:
        if stream is not None and _interesting(line):
            stream.write(line)
            stream.flush()

    args = [str(ROOT), "local", "--stream", "--federation-config",
            f"num-supernodes={n_sites} client-resources-num-cpus=1", "--run-config", flwr_overrides(run_config)]
    log_path = work / FLWR_LOG
    result_file = Path(run_config["output-dir"]) / RESULT
    before = _mtime_ns(result_file)  # an earlier attempt's result: `flwr run` exits 0 when the ServerApp raised
    try:
        code = run_flwr(args, link.env, log_path, show)
    finally:
        link.stop()
    if code != 0 or _mtime_ns(result_file) in (None, before):
        why = f"flwr exit {code}" if code else "the server app ended without a result"
        raise SimulationError(f"the federated run did not complete ({why}); see {log_path} and {link.log_file}")
    return json.loads(result_file.read_text())


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _interesting(line: str) -> bool:
    if is_duplicate_log_line(line):
        return False
    keys = ("round", "ROUND", "refuse", "failed", "dropped", "delivered", "WARNING", "ERROR", "installed",
            "Traceback", "Error", "privacy: ", "distributed DP: ")  # which DP mode ran and what it assumes
    return any(k in line for k in keys)


def finished_run_sites(run_dir: Path):
    """(run config, schema, {site: SiteParts}) of a finished `oncofed simulate --out` run, each site split and
    normalised as it was in the run (`client.site.split_site` with the run's frozen config and the normalisation
    the site saved, whichever preparation made it): for measuring its models on the sites' held-out parts
    afterwards (benchmarks/site_parts.py, benchmarks/ema_offline.py)."""
    from client.site import split_site
    from privacy.run_config import load_run_config
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import NORMALIZER_FILE, Normalizer

    cfg = load_run_config({**json.loads((run_dir / "server" / RUN_FILE).read_text())["run_config"],
                           "base-dir": str(ROOT), "resume": True})  # a run that ran: not judged by a new run's checks
    schema = FeatureSchema.load(run_dir / "sites" / "schema.json")
    saved = {d.name: Normalizer.load(run_dir / "state" / d.name / "state" / NORMALIZER_FILE, schema)
             for d in sorted((run_dir / "sites").glob("C*"))}
    return cfg, schema, {name: split_site(schema, run_dir / "sites" / name, val_fraction=cfg.site.val_fraction,
                                          min_count=cfg.site.min_count, seed=cfg.training.seed,
                                          dp=cfg.privacy.enabled, normalizer=nz) for name, nz in saved.items()}


def site_model_dir(run_config: dict, manifest: dict, site: str) -> Path:
    """The model store of simulated site `site` (its name in the partition's `manifest`), where its ClientApp put it
    under the run config's site-state-root (client.site.simulated_site_paths): its delivery reply names no path."""
    from client.site import simulated_site_paths
    from privacy.run_config import load_run_config
    from shared_models.run_config import app_defaults

    cfg = load_run_config({**app_defaults(ROOT), **run_config})
    return simulated_site_paths(cfg, next(s for s in manifest["sites"] if s["name"] == site)).model_dir


def load_installed(model_dir: Path):
    """(model in eval mode, schema, version) of the active version of a site's model store."""
    from client.model_store import VERSION_SCHEMA, WEIGHTS, ModelStore
    from shared_models.schema import FeatureSchema
    from shared_models.weights import load_weights

    version = ModelStore(model_dir).active()
    schema = FeatureSchema.load(model_dir / version / VERSION_SCHEMA)
    return load_weights(model_dir / version / WEIGHTS, schema).eval(), schema, version


def evaluate_on_site(model_dir: Path, site_dir: Path) -> dict:
    """The installed global model on a labelled site it never saw, normalised with that site's own
    statistics (as a new hospital would serve it)."""
    import torch

    from shared_models.evaluation import classification_metrics, predict_logits
    from shared_models.site_data import load_labelled_site

    model, schema, version = load_installed(model_dir)
    ds = load_labelled_site(schema, site_dir)
    pred = predict_logits(model, torch.from_numpy(ds.x)).argmax(dim=1).numpy()
    m = classification_metrics(ds.y, pred, len(schema.classes))
    present = set(np.unique(ds.y).tolist())
    absent = np.bincount(pred[~np.isin(pred, list(present))], minlength=len(schema.classes))
    return {"patients": int(len(ds.y)), "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"], "model_version": version,
            "per_class_f1": {schema.classes[c]: f for c, f in enumerate(m["per_class_f1"]) if c in present},
            # types none of these patients has, predicted anyway: each counts F1 0 in macro-F1 (scikit-learn's
            # definition: the mean over the types in the labels or the predictions)
            "predicted_absent_types": {schema.classes[c]: int(n) for c, n in enumerate(absent) if n}}


RARE_PATIENTS = 60  # a type with fewer patients across all training sites counts as rare in the summary


def f1_by_class_size(per_class_f1: dict[str, float], class_counts: dict[str, int],
                     threshold: int = RARE_PATIENTS) -> dict:
    """Mean held-out F1 of the types with >= threshold training patients across the federation and of
    the rarer ones (DP-SGD's cost falls on small groups; macro-F1 weighs them like the others)."""
    groups = {"common": [c for c in per_class_f1 if class_counts.get(c, 0) >= threshold],
              "rare": [c for c in per_class_f1 if class_counts.get(c, 0) < threshold]}
    return {name: {"types": sorted(cs), "patients": [class_counts.get(c, 0) for c in sorted(cs)],
                   "mean_f1": float(np.mean([per_class_f1[c] for c in cs])) if cs else None}
            for name, cs in groups.items()} | {"threshold": threshold}


def clean(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


def summarize(metrics_file: Path) -> list[dict]:
    from server.run_files import metrics_lines

    rows = []
    for r in metrics_lines(metrics_file):
        eps = r.get("site_epsilon", {})
        rows.append({"round": r["round"], "sites": len(r.get("participants", [])),
                     "refused": len(r.get("refused", [])), "failed": len(r.get("failures", [])),
                     "macro_f1": r.get("global", {}).get("macro_f1"), "accuracy": r.get("global", {}).get("accuracy"),
                     "max_epsilon": max(eps.values()) if eps else None, "seconds": r.get("seconds"),
                     "server_macro_f1": (r.get("server_eval") or {}).get("macro_f1")})
    return rows


__all__ = ["run_federation", "federation_config", "ensure_partition", "evaluate_on_site", "f1_by_class_size", "summarize", "SimulationError"]
