"""Researcher commands: partitions, synthetic federations, centralized baselines."""

from __future__ import annotations

import time

import typer

from shared_models.cli import fail


def register(app: typer.Typer) -> None:
    from simulations import cli_baseline, cli_report, cli_simulate

    app.command("partition")(partition)
    app.command("synthetic")(synthetic)
    cli_simulate.register(app)
    cli_baseline.register(app)
    app.command("experiment")(experiment)
    cli_report.register(app)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: give comma-separated whole numbers, e.g. {flag} 6000,500")


def partition(
    cohort_dir: str = typer.Argument(..., help="pooled cohort directory (labels + one table per modality)"),
    schema: str = typer.Option(..., "--schema", help="the cohort's schema JSON"),
    out: str = typer.Option(..., "--out", help="federation directory to write (one sub-directory per site)"),
    sites: int | None = typer.Option(None, "--sites", help="number of sites (with --by: one per value)"),
    by: str | None = typer.Option(None, "--by", help="labels column whose values define the sites, e.g. center8"),
    dirichlet: float | None = typer.Option(None, "--dirichlet", help="label skew: Dirichlet alpha (small = skewed)"),
    iid: bool = typer.Option(False, "--iid", help="stratified IID split"),
    seed: int = typer.Option(0, "--seed", min=0, help="random seed (same seed, same partition)"),
    holdout_column: str | None = typer.Option(
        None, "--holdout-column", help="hold out whole groups of this labels column (e.g. tss) for evaluation"),
    holdout_frac: float | None = typer.Option(None, "--holdout-frac", help="share of patients to hold out (default: 0.2)"),
    min_site_patients: int | None = typer.Option(None, "--min-site-patients", help="--dirichlet: fewest patients per "
                                                 "site (default: 10)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a federation directory written before"),
) -> None:
    """Split a pooled cohort into site directories (by a column, Dirichlet label skew or IID) + manifest.json."""
    from shared_models.schema import FeatureSchema, SchemaError
    from shared_models.site_data import TableError
    from simulations.partition import PartitionError, format_manifest, partition_cohort

    # flags the chosen split does not read were dropped without a word (--holdout-frac 0.3 alone held out nobody)
    if holdout_frac is not None and not holdout_column:
        fail(f"--holdout-frac {holdout_frac:g} needs --holdout-column COLUMN, the labels column whose whole groups are "
              "held out (e.g. --holdout-column tss); without it no patient is held out")
    if min_site_patients is not None and dirichlet is None:
        fail(f"--min-site-patients {min_site_patients} applies only to --dirichlet splits; drop it (--by and --iid "
              "give every site its share)")
    try:
        s = FeatureSchema.load(schema)
        start = time.perf_counter()
        manifest = partition_cohort(cohort_dir, s, out, sites=sites, by=by, dirichlet=dirichlet, iid=iid, seed=seed,
                                    holdout_column=holdout_column, overwrite=overwrite,
                                    **{k: v for k, v in (("holdout_frac", holdout_frac),
                                                         ("min_site_patients", min_site_patients)) if v is not None})
    except (SchemaError, TableError, PartitionError) as e:
        fail(str(e))
    how = (f"by {by}" if by else f"Dirichlet alpha={dirichlet}" if dirichlet is not None else "IID") + f", seed {seed}"
    held = f", {manifest.holdout.patients:,} held out by {holdout_column}" if manifest.holdout else ""
    typer.echo(f"wrote {out}: {len(manifest.sites)} sites ({how}){held} in {time.perf_counter() - start:.1f}s")
    typer.echo(format_manifest(manifest, s.modality_names))
    for reason, n in manifest.dropped.items():
        typer.echo(f"not copied: {n:,} rows ({reason})")


def synthetic(
    out: str = typer.Argument(..., help="federation directory to write"),
    sites: int = typer.Option(6, "--sites", help="number of sites"),
    classes: int = typer.Option(4, "--classes", help="number of classes"),
    patients_per_site: int = typer.Option(300, "--patients-per-site", help="mean patients per site"),
    omics_widths: str = typer.Option("6000,500", "--omics-widths", help="features of each omics modality"),
    tabular_columns: int = typer.Option(10, "--tabular-columns", help="columns of the clinical table (0 = none)"),
    alpha: float = typer.Option(0.5, "--alpha", help="label skew: Dirichlet alpha (small = skewed)"),
    signal: float = typer.Option(2.5, "--signal", help="class separation in latent space"),
    batch: float = typer.Option(0.3, "--batch", help="per-site batch effect strength"),
    missing_modality_rate: float = typer.Option(0.15, "--missing-modality-rate",
                                                help="mean share of a site's patients missing each modality"),
    missing_value_rate: float = typer.Option(0.02, "--missing-value-rate", help="mean share of missing cells"),
    holdout_patients: int = typer.Option(0, "--holdout-patients", help="patients of an extra unseen evaluation site"),
    min_site_patients: int | None = typer.Option(
        None, "--min-site-patients", help="fewest patients a site may get (default: patients-per-site / 10, at least 5)"),
    seed: int = typer.Option(0, "--seed", min=0, help="random seed (same seed, same federation)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a federation directory written before"),
) -> None:
    """Generate a synthetic federation: site directories, schema.json and manifest.json."""
    from simulations.partition import PartitionError, format_manifest
    from simulations.synthetic import SyntheticConfig, generate_federation

    cfg = SyntheticConfig(sites=sites, classes=classes, patients_per_site=patients_per_site,
                          omics_widths=_ints(omics_widths, "--omics-widths"), tabular_columns=tabular_columns,
                          alpha=alpha, signal=signal, batch=batch, missing_modality_rate=missing_modality_rate,
                          missing_value_rate=missing_value_rate, holdout_patients=holdout_patients, seed=seed,
                          min_site_patients=min_site_patients)
    start = time.perf_counter()
    try:
        manifest = generate_federation(out, cfg, overwrite=overwrite)
    except PartitionError as e:
        fail(str(e))
    typer.echo(f"wrote {out}: {len(manifest.sites)} synthetic sites, {classes} classes, seed {seed} "
               f"in {time.perf_counter() - start:.1f}s")
    typer.echo(format_manifest(manifest, list(manifest.sites[0].modality_counts)))


def experiment(
    config: str = typer.Argument(..., help="experiment config (TOML), e.g. simulations/experiments/real-study.toml"),
    out: str | None = typer.Option(None, "--out", help="results directory (default: runs/experiments/<name>)"),
    only: str | None = typer.Option(None, "--only", help="run only the cells whose id matches this regular expression"),
) -> None:
    """Run a grid of simulated federations and baselines (resumable: finished cells are skipped) and write
    tidy results (results.csv, results.json: one row per cell x round x site). Then: oncofed report DIR."""
    from pathlib import Path

    from shared_models.schema import SchemaError
    from shared_models.site_data import TableError
    from simulations.experiment import ExperimentConfig, ExperimentError, run_experiment
    from simulations.federation import SimulationError, Terminated, terminate_as_exit
    from simulations.partition import PartitionError

    terminate_as_exit()  # SIGTERM too stops a cell's local SuperLink and its apps
    try:
        name = ExperimentConfig.load(config).experiment.name
        results = Path(out) if out else Path("runs") / "experiments" / name
        run_experiment(config, results, log=typer.echo, only=only)
    except (ExperimentError, SchemaError, TableError, PartitionError) as e:
        fail(str(e))
    except SimulationError as e:
        typer.echo(f"{e}\nthe finished cells are kept: run the same command again to resume", err=True)
        raise typer.Exit(code=1)
    except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C, or SIGTERM/SIGHUP (`timeout`, a closed terminal)
        typer.echo("stopped: the finished cells are kept; run the same command again to resume (the cell that was "
                   "running starts again)", err=True)
        raise typer.Exit(code=e.code if isinstance(e, Terminated) else 130)
    typer.echo(f"next: oncofed report {results}")
