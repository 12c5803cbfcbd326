"""`oncofed baseline`: the centralized yardstick (transformer and logistic regression on held-out sites)."""

from __future__ import annotations

from pathlib import Path

import typer

from shared_models.cli import fail


def register(app: typer.Typer) -> None:
    app.command("baseline")(baseline)


def baseline(
    cohort: str = typer.Option(..., "--cohort", help="pancan33, brca, or a pooled cohort directory (site layout)"),
    schema: Path | None = typer.Option(None, "--schema", help="schema JSON (default: the named cohort's committed schema)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seeds the site split, the initialisation and the batch order"),
    seeds: str | None = typer.Option(None, "--seeds", help="several seeds, e.g. 0,1,2,3,4: one split each, then the "
                                     "mean and standard deviation over splits"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="most transformer epochs (default: TrainConfig's)"),
    test_frac: float = typer.Option(0.2, "--test-frac", min=0.01, max=0.9,
                                    help="share of patients in held-out tss sites (test)"),
    val_frac: float = typer.Option(0.15, "--val-frac", min=0.01, max=0.9,
                                   help="share of the remaining patients in validation sites (early stopping, C)"),
    model: str | None = typer.Option(None, "--model", help='ModelConfig overrides as JSON, e.g. \'{"tabular_blocks": 0}\''),
    only: str | None = typer.Option(None, "--only", help="run one model: transformer or logistic"),
    out: Path | None = typer.Option(None, "--out", help="write the full result as JSON here"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print each epoch's validation metrics"),
) -> None:
    """Centralized baseline on patients from held-out tissue-source sites: transformer vs logistic regression.

    Whole `tss` sites are held out as the test set (the same patients as `oncofed partition
    --holdout-column tss --holdout-frac F --seed S`), whole sites of the rest as validation.
    """
    import json

    import torch

    from shared_models.training import TrainConfig
    from shared_models.run_config import CENTRALIZED_MODEL, ModelConfig
    from shared_models.schema import SchemaError
    from shared_models.site_data import TableError
    from simulations.baseline import BaselineError, format_result, load_cohort, resolve_cohort, run_baseline, save_result

    torch.set_num_threads(1)
    models = ("transformer", "logistic")
    if only is not None:
        if only not in models:
            fail(f"--only {only}: choose transformer or logistic")
        models = (only,)
    try:
        model_cfg = ModelConfig(**{**CENTRALIZED_MODEL.model_dump(), **json.loads(model)}) if model else CENTRALIZED_MODEL
    except (TypeError, ValueError) as e:  # bad JSON, not an object, or a field pydantic refuses
        fail(f"--model {model}: not a valid ModelConfig JSON object ({_reason(e)}); "
              f"e.g. --model '{{\"d_model\": 64, \"tabular_blocks\": 0}}'")
    try:
        data_dir, feature_schema = resolve_cohort(cohort, schema)
        data = load_cohort(data_dir, feature_schema)
        train_cfg = TrainConfig(seed=seed, **({"epochs": epochs} if epochs else {}))

        def log(r) -> None:
            v = r.val or {}
            typer.echo(f"epoch {r.epoch:>3}  train loss {r.train_loss:.4f}  lr {r.lr:.2e}  {r.seconds:5.1f} s  "
                       f"val loss {v.get('loss', float('nan')):.4f}  macro-F1 {v.get('macro_f1', float('nan')):.3f}")

        seed_list = _seed_list(seeds) if seeds else [seed]
        results = []
        for s in seed_list:
            cfg = train_cfg.model_copy(update={"seed": s})
            results.append(run_baseline(data, seed=s, train_cfg=cfg, model_cfg=model_cfg, test_frac=test_frac,
                                        val_frac=val_frac, models=models, log=log if verbose else None))
            typer.echo(format_result(results[-1]))
    except (BaselineError, SchemaError, TableError) as e:
        fail(str(e))
    result = results[0] if len(results) == 1 else summarize_seeds(results)
    if len(results) > 1:
        typer.echo(format_seeds(result))
    if out is not None:
        save_result(result, out)
        typer.echo(f"wrote {out}")


def _seed_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--seeds {text}: give whole numbers separated by commas, e.g. --seeds 0,1,2")
    if not out:
        fail("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return out


def summarize_seeds(results: list[dict]) -> dict:
    """Mean and sample standard deviation (n-1, as the experiment report gives) of each model's test metrics over
    splits, plus every split's result."""
    import numpy as np

    from shared_models.protocol import SCORES

    summary = {}
    for model in ("transformer", "logistic"):
        rows = [r[model]["test"] for r in results if model in r]
        if rows:
            summary[model] = {m: {"mean": float(np.mean([x[m] for x in rows])), "sd": float(np.std([x[m] for x in rows], ddof=1)),
                                  "per_seed": [x[m] for x in rows]} for m in SCORES}
    return {"seeds": [r["seed"] for r in results], "summary": summary, "runs": results}


def format_seeds(result: dict) -> str:
    lines = [f"over {len(result['seeds'])} splits (seeds {', '.join(map(str, result['seeds']))}): mean +- sample sd (n-1)",
             f"{'model':<20} {'accuracy':>14} {'balanced acc.':>14} {'macro-F1':>14}"]
    names = {"transformer": "transformer", "logistic": "logistic regression"}
    for model, s in result["summary"].items():  # in SCORES' order (summarize_seeds)
        lines.append(f"{names[model]:<20} " + " ".join(f"{v['mean']:>8.3f} +-{v['sd']:.3f}" for v in s.values()))
    return "\n".join(lines)


def _reason(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join((f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "")
                         + err["msg"].removeprefix("Value error, ") for err in e.errors())
    return str(e).splitlines()[0]
