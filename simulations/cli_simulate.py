"""`oncofed simulate`: a federated run of the vendored pan-cancer cohort's hospitals, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from server.run_files import METRICS


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def simulate(
    out: Path = typer.Option(Path("runs/main"), help="working directory: sites, site state, server output"),
    # None: the run config's default (shared_models/run_config.py), which the run's first line prints
    rounds: int | None = typer.Option(None, min=1, help="federated rounds (default: the run config's num-rounds)"),
    epsilon: float | None = typer.Option(None, help="each site's privacy budget for the run (default: the run "
                                         "config's epsilon)"),
    dp: bool | None = typer.Option(None, "--dp/--no-dp", help="record-level DP-SGD at every site (default: the run "
                                   "config's dp)"),
    secagg: bool | None = typer.Option(None, "--secagg/--no-secagg", help="Flower SecAgg+ (default: the run config's "
                                       "secagg)"),
    strategy: str | None = typer.Option(None, help="the server's strategy (default: the run config's strategy; a "
                                        "wrong name lists them)"),
    local_epochs: int | None = typer.Option(None, min=1, help="local epochs a round (default: the run config's)"),
    lr: float | None = typer.Option(None, help="peak local learning rate (default: the run config's recipe for the "
                                    "run's dp and local-optimizer, see the operator guide; under DP with SGD give "
                                    "--set max-grad-norm=C too: a step scales with lr x C)"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help="batch size; under DP the public divisor of the clipped-gradient sum "
                                          "(default: the recipe's; under DP sample-rate x a public patient count, see "
                                          "the operator guide)"),
    eval_data: bool = typer.Option(False, "--eval-data/--no-eval-data",
                                   help="also score the global model on the held-out patients at the server after "
                                        "every round (as an operator's validation site would be)"),
    seed: int = typer.Option(0, min=0, help="the partition's draw and the run's seed (--set seed=S: another run seed "
                             "on the same partition)"),
    fresh: bool = typer.Option(True, "--fresh/--keep", help="start from new site ledgers and models"),
    overrides: list[str] = typer.Option([], "--set", help="any run-config key no option above sets (one "
                                        "given both ways is refused), e.g. --set wide-rank=0 --set fusion-blocks=1 "
                                        "(keys: tool.flwr.app.config in pyproject.toml)"),
) -> None:
    """Federate the 8 center8 hospitals of the vendored TCGA pan-cancer cohort and report the global
    model on patients of tissue-source sites no hospital holds."""
    import shutil

    from simulations.federation import ROOT, SimulationError, ensure_partition, evaluate_on_site, run_federation
    from simulations.federation import SETTING_KEYS, SIMULATION_SETS, f1_by_class_size, federation_config
    from simulations.federation import site_model_dir, summarize, terminate_as_exit
    from simulations.partition import FederationManifest, PartitionError

    extra = _parse_overrides(overrides)
    if reserved := sorted(SIMULATION_SETS.keys() & set(extra)):
        typer.echo(f"--set {', '.join(reserved)}: oncofed simulate sets {'these' if len(reserved) > 1 else 'this'} "
                   f"itself (its working files live under --out; the eval data: --eval-data)", err=True)
        raise typer.Exit(code=2)
    args = locals()
    settings = {name: args[name] for name in SETTING_KEYS}  # the options of the same names
    # federation_config applies --set after the options: one of the two would be dropped without a word
    if twice := [(name, v) for name, v in settings.items() if v is not None and SETTING_KEYS[name] in extra]:
        for name, value in twice:
            key, flag = SETTING_KEYS[name], "--" + name.replace("_", "-")
            if isinstance(value, bool):
                option = flag if value else "--no-" + flag[2:]
            else:
                option = f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"
            written = next(i.strip() for i in reversed(overrides) if i.partition("=")[0].strip() == key)
            typer.echo(f"{option} and --set {written} both set {key}: give it once (the option or the --set)",
                       err=True)
        raise typer.Exit(code=2)
    terminate_as_exit()  # SIGTERM too stops the local SuperLink and its apps
    out = out.resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        sites = ensure_partition(out / "sites", seed=seed, replace=fresh)  # may refuse: before anything is deleted
    except (OSError, PartitionError) as e:
        typer.echo(f"--out {out}: {e}", err=True)
        raise typer.Exit(code=2)
    except SimulationError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    manifest = json.loads((sites / "manifest.json").read_text())
    n_sites = len(manifest["sites"])
    cfg = federation_config(out, sites, n_sites, **settings, seed=seed,
                            eval_data=sites / manifest["holdout"]["dir"] if eval_data else None, extra=extra)
    from privacy.run_config import load_run_config
    from shared_models.run_config import RunConfigError, app_defaults

    try:  # the whole run config (as `flwr run` will merge it), before a SuperLink starts: a bad value stops here
        run = load_run_config({**app_defaults(ROOT), **cfg}, source="oncofed simulate")
    except RunConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    # the DP the run will have, however it was given (--no-dp, --set dp=false, dp=False, dp=0, pyproject)
    if not run.privacy.enabled and (epsilon is not None or "epsilon" in extra):
        typer.echo(f"epsilon {run.privacy.epsilon:g} with DP off: a run without DP spends no epsilon; drop one of "
                   "them", err=True)
        raise typer.Exit(code=2)
    if not (schema_file := run.path(run.run.schema_path)).is_file():  # else found by the server, after Ray starts
        typer.echo(f"schema {run.run.schema_path}: {schema_file} is not a file; pass an existing schema "
                   "(--set schema=PATH, relative to the project directory)", err=True)
        raise typer.Exit(code=2)
    # only a run that will start clears the last one's output: the server's is this run's alone (its metrics and
    # result are read back); --keep keeps the sites' ledgers and models
    try:
        for sub in (("state", "server", "flower") if fresh else ("server", "flower")):
            shutil.rmtree(out / sub, ignore_errors=True)
        # the last run's summary goes with its server output: left beside this run's, it would describe a run
        # whose files are gone (and stand for this one if this one fails)
        (out / "summary.json").unlink(missing_ok=True)
        (out / "flower").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        typer.echo(f"--out {out}: {e}", err=True)
        raise typer.Exit(code=2)
    dp_text = f"on ({run.privacy.mode} mode), epsilon {run.privacy.epsilon:g}" if run.privacy.enabled else "off"
    fed, training = run.federation, run.training
    if run.privacy.distributed:  # a round is one DP step the server takes: local epochs, lr and optimizer are unused
        schedule = (f"{fed.strategy} server-lr {fed.server_lr:g}"
                    + (f" momentum {training.momentum:g}" if fed.strategy == "fedavgm" else "")
                    + f", {fed.num_rounds} rounds of one DP step of the consortium (sample-rate "
                    f"{run.privacy.sample_rate:g}, clipping bound {run.privacy.max_grad_norm:g}, the noisy sum divided "
                    f"by batch-size {training.batch_size})")
    else:
        schedule = (f"{fed.strategy}, {fed.num_rounds} rounds of {training.local_epochs} local epochs, batch "
                    f"{training.batch_size}, {training.optimizer} lr {training.lr:g}")
    typer.echo(f"{n_sites} hospitals ({', '.join(s['name'] for s in manifest['sites'])}), "
               f"{manifest['holdout']['patients']:,} held-out patients; DP {dp_text}, SecAgg+ "
               f"{'on' if run.secagg.enabled else 'off'}, {schedule}"
               + (f", modality dropout {run.model.modality_dropout_rate:g}" if run.model.modality_dropout_rate else "")
               + f", seed {run.training.seed} (partition seed {seed})")
    t0 = time.time()
    try:
        result = run_federation(out / "flower", cfg, n_sites=n_sites)
    except SimulationError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=1)
    typer.echo(f"\n{'round':>5} {'sites':>5} {'refused':>7} {'macro-F1':>8} {'accuracy':>8} {'held-out F1':>11} "
               f"{'max eps':>7} {'s':>6}   (macro-F1, accuracy: on the sites' own held-out parts)")
    rounds_done = summarize(out / "server" / METRICS)
    for r in rounds_done:
        f1, acc, held_f1, eps = (("-" if r[k] is None else f"{r[k]:.{p}f}") for k, p in
                                 (("macro_f1", 3), ("accuracy", 3), ("server_macro_f1", 3), ("max_epsilon", 2)))
        typer.echo(f"{r['round']:>5} {r['sites']:>5} {r['refused']:>7} {f1:>8} {acc:>8} {held_f1:>11} {eps:>7} "
                   f"{r['seconds']:>6.0f}")
    if not any(r["sites"] for r in rounds_done):
        typer.echo("no round aggregated an update from any site (see 'refused' above and the sites' reasons in "
                   f"{out / 'flower'}): the global model is the initial one, so it is not evaluated", err=True)
        raise typer.Exit(code=1)
    if result.get("not_delivered"):
        typer.echo(f"run {result['run']}: {result['not_delivered']}", err=True)
        raise typer.Exit(code=1)
    installed = [d for d in result["deliveries"] if d.get("installed")]
    configs = write_site_configs(out, sites, manifest, {**cfg, "epsilon": run.privacy.epsilon})
    typer.echo(f"each site's site.json: {configs[0].parent.parent}/<site>/site.json (serve one with `oncofed serve "
               f"--site-config {configs[0]}`)")
    typer.echo(f"\nglobal model {result['arrays_sha256'][:12]} (signed) installed and verified at {len(installed)}/"
               f"{n_sites} sites")
    for d in result["deliveries"]:
        if not d.get("installed"):
            typer.echo(f"  site {d.get('site', d.get('node'))} did not install it: {d.get('error')}", err=True)
    if not installed:
        typer.echo("no site installed the global model; nothing to evaluate", err=True)
        raise typer.Exit(code=1)
    held = evaluate_on_site(site_model_dir(cfg, manifest, installed[0]["site"]), sites / manifest["holdout"]["dir"])
    typer.echo(f"held-out tss patients ({held['patients']:,}): accuracy {held['accuracy']:.3f}, balanced accuracy "
               f"{held['balanced_accuracy']:.3f}, macro-F1 {held['macro_f1']:.3f}")
    counts = FederationManifest.load(sites / "manifest.json").federation_class_counts
    held["by_class_size"] = sizes = f1_by_class_size(held["per_class_f1"], counts)
    common, rare = sizes["common"], sizes["rare"]
    if common["types"] and rare["types"]:
        typer.echo(f"  by type size across the hospitals: {len(common['types'])} types with >= {sizes['threshold']} "
                   f"patients, mean F1 {common['mean_f1']:.3f}; {len(rare['types'])} with fewer "
                   f"({', '.join(rare['types'])}: {min(rare['patients'])}-{max(rare['patients'])}), "
                   f"mean F1 {rare['mean_f1']:.3f}")
    if held["predicted_absent_types"]:
        import numpy as np

        typer.echo("  predicted although no held-out patient has them (each counts F1 0 in macro-F1): " + ", ".join(
            f"{k} for {n} patient{'s' if n > 1 else ''}" for k, n in held["predicted_absent_types"].items())
            + f"; macro-F1 over the {len(held['per_class_f1'])} types the held-out patients have: "
              f"{np.mean(list(held['per_class_f1'].values())):.3f}")
    if patterns := result.get("patterns"):  # the package's measurement, which sites flag answers by until calibrated
        from privacy.site_config import ServeSettings

        floor = ServeSettings().min_pattern_accuracy  # the sites' default serve.min-pattern-accuracy
        order = sorted(patterns.values(), key=lambda e: e["accuracy"])
        weak = [e for e in order if e["accuracy"] < floor]
        typer.echo(f"  the package measures {len(patterns)} modality patterns on the sites' held-out parts (others "
                   f"masked): {len(weak)} below {floor:g}, answers from them flagged weak_pattern where a site's "
                   "own calibration has not measured them"
                   + (f"; weakest {'+'.join(order[0]['modalities'])} {order[0]['accuracy']:.2f}" if weak else "")
                   + f"; best {'+'.join(order[-1]['modalities'])} {order[-1]['accuracy']:.2f}")
    eps = result.get("site_epsilon", {})
    if eps:
        typer.echo("epsilon spent per site: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(eps.items())))
    (out / "summary.json").write_text(json.dumps({"held_out": held, "seconds": round(time.time() - t0, 1),
                                                  "site_epsilon": eps, "config": cfg}, indent=1))
    typer.echo(f"total {time.time() - t0:.0f} s; details in {out}")


def _parse_overrides(items: list[str]) -> dict:
    """--set KEY=VALUE pairs, typed as TOML would type them and checked against the run config at once."""
    from privacy.run_config import parse_run_overrides
    from shared_models.run_config import RunConfigError

    try:
        return parse_run_overrides(items, source="--set")
    except RunConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)


def write_site_configs(out: Path, sites: Path, manifest: dict, cfg: dict) -> list[Path]:
    """A site.json per simulated hospital, as `oncofed site init` writes for a real one, so that
    `oncofed serve --site-config`, `oncofed predict` and `oncofed serve token add` work on the run's output."""
    from privacy.site_config import SiteConfig

    paths = []
    for site in manifest["sites"]:
        root = Path(cfg["site-state-root"]) / site["name"]
        settings = SiteConfig(site_name=site["name"], data_path=str(sites / site["dir"]), state_dir=str(root / "state"),
                              model_dir=str(root / "models"), signing_public_key=cfg.get("signing-public-key", ""),
                              privacy_budget=cfg.get("epsilon"), simulated=True)
        root.mkdir(parents=True, exist_ok=True)
        settings.write(root / "site.json")
        paths.append(root / "site.json")
    return paths
