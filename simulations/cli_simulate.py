"""`oncofed simulate`: a federated run of the vendored pan-cancer cohort's hospitals, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def simulate(
    out: Path = typer.Option(Path("runs/main"), help="working directory: sites, site state, server output"),
    rounds: int = typer.Option(10, min=1),
    epsilon: float = typer.Option(8.0, help="each site's privacy budget"),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="record-level DP-SGD at every site"),
    secagg: bool = typer.Option(True, "--secagg/--no-secagg", help="Flower SecAgg+"),
    strategy: str = typer.Option("fedavg", help="fedavg | fedprox | fedadam"),
    local_epochs: int = typer.Option(2, min=1),
    lr: float = typer.Option(0.002),
    seed: int = typer.Option(0),
    fresh: bool = typer.Option(True, "--fresh/--keep", help="start from new site ledgers and models"),
) -> None:
    """Federate the 8 center8 hospitals of the vendored TCGA pan-cancer cohort and report the global
    model on patients of tissue-source sites no hospital holds."""
    from simulations.federation import ROOT, SimulationError, ensure_partition, evaluate_on_site, run_federation
    from simulations.federation import summarize

    out = out.resolve()
    if fresh:
        import shutil

        for sub in ("state", "server", "flower"):
            shutil.rmtree(out / sub, ignore_errors=True)
    sites = ensure_partition(out / "sites", seed=seed)
    manifest = json.loads((sites / "manifest.json").read_text())
    n_sites = len(manifest["sites"])
    typer.echo(f"{n_sites} hospitals ({', '.join(s['name'] for s in manifest['sites'])}), "
               f"{manifest['holdout']['patients']:,} held-out patients; DP {'on, epsilon ' + str(epsilon) if dp else 'off'}"
               f", SecAgg+ {'on' if secagg else 'off'}, {strategy}, {rounds} rounds")
    (out / "flower").mkdir(parents=True, exist_ok=True)
    cfg = {"base-dir": str(ROOT), "data-root": str(sites), "site-state-root": str(out / "state"),
           "output-dir": str(out / "server"), "num-rounds": rounds, "sites": n_sites, "min-sites": 2,
           "epsilon": epsilon, "dp": dp, "secagg": secagg, "strategy": strategy, "local-epochs": local_epochs,
           "lr": lr, "seed": seed, "round-timeout": 900.0}
    t0 = time.time()
    try:
        result = run_federation(out / "flower", cfg, n_sites=n_sites)
    except SimulationError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=1)
    typer.echo(f"\n{'round':>5} {'sites':>5} {'refused':>7} {'macro-F1':>8} {'accuracy':>8} {'max eps':>7} {'s':>6}")
    for r in summarize(out / "server" / "metrics.jsonl"):
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        typer.echo(f"{r['round']:>5} {r['sites']:>5} {r['refused']:>7} {f1:>8} {acc:>8} {eps:>7} {r['seconds']:>6.0f}")
    installed = [d for d in result["deliveries"] if d.get("installed")]
    typer.echo(f"\nglobal model {result['arrays_sha256'][:12]} installed at {len(installed)}/{n_sites} sites")
    held = evaluate_on_site(Path(installed[0]["path"]).parent, sites / manifest["holdout"]["dir"])
    typer.echo(f"held-out tss patients ({held['patients']:,}): accuracy {held['accuracy']:.3f}, balanced accuracy "
               f"{held['balanced_accuracy']:.3f}, macro-F1 {held['macro_f1']:.3f}")
    eps = result.get("site_epsilon", {})
    if eps:
        typer.echo("epsilon spent per site: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(eps.items())))
    (out / "summary.json").write_text(json.dumps({"held_out": held, "seconds": round(time.time() - t0, 1),
                                                  "site_epsilon": eps, "config": cfg}, indent=1))
    typer.echo(f"total {time.time() - t0:.0f} s; details in {out}")
