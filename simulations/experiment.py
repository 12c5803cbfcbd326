"""`oncofed experiment CONFIG.toml`: a grid of simulated federations and baselines, resumable, tidy.

A config names the grid (data x partition x sites x strategy x privacy x seed) and the baselines;
every federated cell is a real `flwr run` through Flower's simulation engine (the same ServerApp and
ClientApp as a deployment, DP-SGD at the sites, SecAgg+ unless the run section turns it off), and
every baseline trains the same model (or a logistic regression) on the same partition:

    RESULTS/partitions/<data>-<partition>-<n>-s<seed>-<h>/  site directories + held-out patients (<h>: a hash
                                                          of every setting that shapes them, so none is reused
                                                          under other [synthetic] or hold-out settings)
    RESULTS/cells/<cell>/                                 one directory per cell; rows.json when done
    RESULTS/results.csv, results.json                     one row per cell x round x site

Finished cells (a rows.json that reads as one) are skipped on a second run, so an interrupted grid resumes; an
unfinished cell is started again from scratch (its partial files are removed first). Evaluation is
always on patients of held-out sites (`holdout-column`, or the synthetic generator's extra site), each
normalised with its own statistics, as a hospital that never trained would serve the model.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from privacy import MAX_BUDGET
from shared_models.files import atomic_file, write_json_atomic, write_text_atomic
from shared_models.run_config import FederationSection, Strategy, TrainingSection
from simulations.federation import SIMULATION_SETS
from simulations.partition import HOLDOUT_FRAC, MIN_SITE_PATIENTS
from server.run_files import METRICS, metrics_lines

ROOT = Path(__file__).resolve().parents[1]
Method = Literal["pooled", "pooled-cv", "local", "logistic", "local-logistic"]
METHODS = get_args(Method)
TRANSFORMER_BASELINES = {"pooled", "pooled-cv", "local"}  # the baselines that train the federation's model
# [run] keys each cell sets itself (or an operator's, which a simulation sets or has no use for), and where a config
# says them instead
RESERVED_RUN_KEYS = {**SIMULATION_SETS, "data-root": "the cell's partition", "site-state-root": "the cell's directory",
                     "output-dir": "the cell's directory", "num-rounds": "[experiment] rounds",
                     "local-epochs": "[experiment] local-epochs", "sites": "[grid] sites", "dp": "[grid] privacy",
                     "epsilon": "[grid] privacy", "strategy": "[grid] strategy", "seed": "[grid] seed",
                     "schema": "the data set", "eval-data": "the partition's held-out patients"}
# [synthetic] keys (SyntheticConfig fields) each cell sets itself
RESERVED_SYNTHETIC_KEYS = {"sites": "[grid] sites", "alpha": "[grid] partition (iid or dirichlet:ALPHA)",
                           "seed": "[grid] seed", "min-site-patients": "[experiment] min-site-patients"}
COLUMNS = ["experiment", "cell", "data", "partition", "sites", "strategy", "privacy", "epsilon_target", "seed",
           "method", "round", "site", "patients", "accuracy", "balanced_accuracy", "macro_f1", "epsilon_spent",
           "seconds"]
TSNE_SITE_SAMPLE = 150  # patients per federated site embedded for the 2-D map coloured by site


class ExperimentError(ValueError):
    """A config or results directory that cannot be used; the message names the key or file and the fix."""


# --- the config ------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=lambda s: s.replace("_", "-"))


class ExperimentSection(_Strict):
    name: str = Field(..., min_length=1)
    rounds: int = Field(FederationSection.model_fields["num_rounds"].default, ge=1)
    local_epochs: int = Field(TrainingSection.model_fields["local_epochs"].default, ge=1)
    holdout_column: str = "tss"
    holdout_frac: float = Field(HOLDOUT_FRAC, gt=0, lt=0.9)
    # Dirichlet and IID partitions (the grid's check refuses an IID split below it: the split itself has no minimum):
    # the fewest patients a site may get; unset, a cohort's partition takes simulations.partition.MIN_SITE_PATIENTS
    # and the synthetic generator its own (patients-per-site / 10)
    min_site_patients: int | None = Field(None, ge=1)

    def cohort_min_site_patients(self) -> int:
        """The fewest patients a cohort's Dirichlet partition gives a site: the setting, or the partition's default."""
        return self.min_site_patients or MIN_SITE_PATIENTS


class GridSection(_Strict):
    data: list[str] = Field(..., min_length=1)
    strategy: list[Strategy] = ["fedavg"]
    privacy: list[str | float] = ["off"]
    sites: list[int] | dict[str, list[int]] = [8]
    partition: list[str] | dict[str, list[str]] = ["iid"]
    seed: list[Annotated[int, Field(ge=0)]] = [0]

    @field_validator("sites")
    @classmethod
    def _sites(cls, v):
        counts = v if isinstance(v, list) else [n for ns in v.values() for n in ns]
        if any(n < 1 for n in counts):
            raise ValueError("every site count must be at least 1")
        return v

    @field_validator("privacy")
    @classmethod
    def _privacy(cls, v):
        for p in v:
            if not (p == "off" or (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= MAX_BUDGET)):
                raise ValueError(f"{p!r}: give \"off\" or a per-site epsilon in (0, {MAX_BUDGET:g}] (the largest budget "
                                 "a site's accounting verifies), e.g. privacy = [\"off\", 1, 3, 8]")
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v):
        for p in (itertools.chain(*v.values()) if isinstance(v, dict) else v):
            parse_partition(p)
        return v

    def for_data(self, name: str, field: str) -> list:
        value = getattr(self, field)
        if isinstance(value, dict):
            if name not in value:
                raise ExperimentError(f"[grid] {field}: no entry for data {name!r}; add {name} = [...] to "
                                      f"[grid.{field}] or give one list for every data set")
            return value[name]
        return value


class BaselineSection(_Strict):
    methods: list[Method] = []
    cv_folds: int = Field(5, ge=2)


class ExperimentConfig(_Strict):
    experiment: ExperimentSection
    grid: GridSection
    baselines: BaselineSection = BaselineSection()
    run: dict[str, Any] = {}  # run-config overrides for every federated cell (keys of [tool.flwr.app.config])
    synthetic: dict[str, Any] = {}  # SyntheticConfig fields for data = "synthetic"

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        path = Path(path)
        if not path.is_file():
            raise ExperimentError(f"{path}: experiment config not found; see simulations/experiments/ for examples")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ExperimentError(f"{path}: not valid TOML ({e})") from e
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as e:
            raise ExperimentError(f"{path}: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}{_known_keys(err)}"
                for err in e.errors()))
        try:
            cfg.check(path)
        except ExperimentError as e:
            raise ExperimentError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
        return cfg

    def run_config(self) -> dict:
        """The project's run config ([tool.flwr.app.config]) with this experiment's [run] overrides."""
        from shared_models.run_config import app_defaults

        return {**app_defaults(ROOT), **self.run}

    def check(self, path: Path) -> None:
        """Everything a cell would stop on, before any cell runs: a grid that fails at its tenth cell has spent
        the first nine's hours."""
        from privacy.run_config import load_run_config

        for name in self.grid.data:
            if name != "synthetic":
                data_dir(name)  # raises naming the data set
        self._check_distinct()
        grid = cells(self)  # raises naming a data set a per-data [grid] table leaves out
        for field in ("sites", "partition"):  # a misspelt data name's entry was ignored without a word
            value = getattr(self.grid, field)
            if isinstance(value, dict) and (unknown := [n for n in value if n not in self.grid.data]):
                raise ExperimentError(f"[grid.{field}] {', '.join(unknown)}: not among [grid] data ("
                                      f"{', '.join(self.grid.data)}), so no cell would use it; correct the name or "
                                      "add the data set to [grid] data")
        ids: dict[str, Cell] = {}
        for cell in grid:
            if (other := ids.setdefault(cell.id, cell)) is not cell:
                raise ExperimentError(f"[grid] partition: {other.partition!r} and {cell.partition!r} give the same "
                                      f"cell id {cell.id!r} (its results would overwrite the other's); keep one")
        if reserved := sorted(RESERVED_RUN_KEYS.keys() & set(self.run)):  # before the run-config check: a valid
            # value of one (resume = true) passed it and stopped the first cell's server app without a word
            raise ExperimentError(f"{path} [run]: {reserved} are set by the grid, [experiment] or the simulation (" +
                                  ", ".join(f"{k}: {RESERVED_RUN_KEYS[k]}" for k in reserved) + "); remove them "
                                  "from [run]")
        counts = self.grid.sites if isinstance(self.grid.sites, list) else \
            sorted({n for ns in self.grid.sites.values() for n in ns})
        # as the cells will run it: dp, epsilon, strategy and sites from the grid, rounds and local epochs from
        # [experiment] (dp-mode "distributed" refuses local-epochs other than the default: it takes no local step)
        every = {"num-rounds": self.experiment.rounds, "local-epochs": self.experiment.local_epochs}
        for privacy in self.grid.privacy:
            for strategy in self.grid.strategy:
                for n in counts:
                    cell = {"dp": False} if privacy == "off" else {"dp": True, "epsilon": float(privacy)}
                    cell.update(strategy=strategy, sites=n, **every)
                    try:
                        load_run_config({**self.run_config(), **cell}, source=f"{path} [run] with privacy = "
                                        f"{privacy!r}, strategy = {strategy!r}, sites = {n} ([experiment] rounds = "
                                        f"{self.experiment.rounds}, local-epochs = {self.experiment.local_epochs})")
                    except ValueError as e:
                        raise ExperimentError(str(e)) from e
        if TRANSFORMER_BASELINES & set(self.baselines.methods):
            try:  # the baselines train the model as a no-DP cell resolves it (baseline_model_config)
                baseline_model_config(self, source=f"{path} [run] as the baselines train without DP (dp = false)")
            except ValueError as e:
                raise ExperimentError(str(e)) from e
        if reserved := [k for k in self.synthetic if k.replace("_", "-") in RESERVED_SYNTHETIC_KEYS]:
            raise ExperimentError(f"{path} [synthetic]: {reserved} are set for each cell (" + ", ".join(
                f"{k}: {RESERVED_SYNTHETIC_KEYS[k.replace('_', '-')]}" for k in reserved) + "); remove them from "
                "[synthetic]")
        for name in self.grid.data:  # before [synthetic]: a by:COLUMN partition has no alpha to give the generator
            self._check_partitions(name)
        from simulations.synthetic import SyntheticConfig

        first = next((c for c in grid if c.data == "synthetic"), None)
        try:  # as the synthetic cells will run it (or as written, when no cell uses it)
            generator = synthetic_config(self, first) if first else \
                SyntheticConfig(**{k.replace("-", "_"): v for k, v in self.synthetic.items()})
        except TypeError as e:
            from dataclasses import fields

            keys = [f.name.replace("_", "-") for f in fields(SyntheticConfig)
                    if f.name.replace("_", "-") not in RESERVED_SYNTHETIC_KEYS]
            raise ExperimentError(f"{path} [synthetic]: {str(e).removeprefix('SyntheticConfig.__init__() ')}; the keys "
                                  f"are SyntheticConfig's fields (simulations/synthetic.py): {', '.join(keys)}") from None
        least = self.experiment.min_site_patients
        if first and least and isinstance(generator.patients_per_site, int) and least > generator.patients_per_site:
            raise ExperimentError(f"{path} [experiment] min-site-patients = {least}: more than [synthetic] "
                                  f"patients-per-site = {generator.patients_per_site}, the mean a synthetic site gets, "
                                  "so no draw can give every site that many; lower min-site-patients or raise "
                                  "patients-per-site")
        if first and generator.holdout_patients == 0:
            raise ExperimentError(f"{path} [synthetic] holdout-patients = 0: every cell is scored on the held-out "
                                  f"site's patients; give at least 1 ({SYNTHETIC_HOLDOUT_PATIENTS} if left out)")
        try:
            generator.check()
        except (TypeError, ValueError) as e:  # the generator's own check names the setting as its CLI flag
            raise ExperimentError(f"{path} [synthetic]: {str(e).replace('--', '')}") from e
        from simulations.synthetic import SyntheticError, site_assignment

        for cell in {c.part_key: c for c in grid if c.data == "synthetic"}.values():
            try:  # the draw of each synthetic partition's sites is cheap: its failure need not wait for the cell
                site_assignment(synthetic_config(self, cell))
            except SyntheticError:
                least = self.experiment.min_site_patients or max(5, generator.patients_per_site // 10)
                draw, alpha = ("the IID split does not give", "") if cell.partition == "iid" else \
                    ("no Dirichlet draw gives", "a larger alpha or ")
                raise ExperimentError(
                    f"{path} [grid] partition {cell.partition!r} with sites = {cell.sites}, seed = {cell.seed} (data "
                    f"'synthetic'): {draw} every site {least} patients; use {alpha}fewer [grid] sites, lower "
                    "[experiment] min-site-patients or raise [synthetic] patients-per-site") from None

    def unused_settings(self) -> list[str]:
        """Settings the config gives that no cell reads (they run fine, but the reader thinks they count)."""
        notes = []
        given = self.experiment.model_fields_set & {"holdout_column", "holdout_frac"}
        if given and set(self.grid.data) == {"synthetic"}:
            keys = " and ".join(sorted(k.replace("_", "-") for k in given))
            notes.append(f"[experiment] {keys}: unused, the grid has only synthetic data, whose held-out patients are "
                         "the generator's extra site ([synthetic] holdout-patients)")
        if "cv_folds" in self.baselines.model_fields_set and "pooled-cv" not in self.baselines.methods:
            notes.append("[baselines] cv-folds: unused, [baselines] methods has no pooled-cv")
        return notes

    def _check_distinct(self) -> None:
        """Equal values in a [grid] list (8 and 8.0, seed 0 twice, by:center8 and center8) would be one cell run
        once and counted twice in results.csv."""
        keys = {"privacy": lambda v: v if v == "off" else float(v), "partition": parse_partition}
        for field in ("data", "strategy", "privacy", "sites", "partition", "seed"):
            value = getattr(self.grid, field)
            for where, values in ([(f"[grid] {field}", value)] if isinstance(value, list) else
                                  [(f"[grid.{field}] {name}", v) for name, v in value.items()]):
                seen: dict[Any, Any] = {}
                for v in values:
                    k = keys.get(field, lambda x: x)(v)
                    if k in seen:
                        same = f"{seen[k]!r} and {v!r} are the same value" if repr(seen[k]) != repr(v) else \
                            f"{v!r} is listed twice" + (" (8 and 8.0 are one epsilon)" if field == "privacy" else "")
                        raise ExperimentError(f"{where}: {same}; equal values are one cell, run once and its rows "
                                              "counted twice in results.csv: list each value once")
                    seen[k] = v

    def _check_partitions(self, data: str) -> None:
        """A data set's partitions as the cells will make them: a by:COLUMN the data has, no more sites than the
        patients or the column's values allow. Reads the labels table's header and only the columns needed."""
        from shared_models.schema import FeatureSchema, SchemaError
        from shared_models.site_data import LABELS_STEM, TableError, find_table
        from simulations.partition import (PartitionError, assign_dirichlet, choose_holdout, column_text,
                                           encode_label_column, read_text_table, table_columns)

        specs = [(spec, *parse_partition(spec)) for spec in self.grid.for_data(data, "partition")]
        counts = self.grid.for_data(data, "sites")
        if data == "synthetic":
            for spec, kind, _ in specs:
                if kind == "by":
                    raise ExperimentError(f"[grid] partition {spec!r}: synthetic data has no site column to split by; "
                                          "use iid or dirichlet:ALPHA for it, e.g. partition = { synthetic = [\"iid\"], "
                                          "pancan33 = [\"by:center8\"] }")
            return
        by = sorted({arg for _, kind, arg in specs if kind == "by"})
        cohort, schema_path = data_dir(data)
        found = find_table(cohort, LABELS_STEM)
        if not found:
            raise ExperimentError(f"[grid] data {data!r}: {cohort} has no labels table (labels.csv)")
        labels = found[0]
        try:
            header = table_columns(labels)
        except TableError as e:
            raise ExperimentError(f"[grid] data {data!r}: {e}") from None
        column = self.experiment.holdout_column
        if column not in header:
            raise ExperimentError(f"[experiment] holdout-column = {column!r}: {labels} has no column {column!r} "
                                  f"(data {data!r}); its columns are {header}")
        for spec, kind, arg in specs:
            if kind == "by" and arg not in header:
                raise ExperimentError(f"[grid] partition {spec!r}: {labels} has no column {arg!r} (data {data!r}); "
                                      f"its columns are {header}")
        try:
            schema = FeatureSchema.load(schema_path)
            table, _ = read_text_table(labels, schema.id_column, [column, schema.label_column, *by])
            y = encode_label_column(table, labels, schema)
        except (TableError, SchemaError, PartitionError) as e:
            raise ExperimentError(f"[grid] data {data!r}: {e}") from None
        values = {c: column_text(table, c) for c in [column, *by]}
        for c, where in [(column, "[experiment] holdout-column"), *((b, "[grid] partition") for b in by)]:
            if (values[c] == "").any():
                raise ExperimentError(f"{where}: some patients in {labels} have no {c!r} value (data {data!r}); fill "
                                      "them in or choose another column")
        least, frac = self.experiment.cohort_min_site_patients(), self.experiment.holdout_frac

        def held_out(seed: int) -> tuple[np.ndarray, np.random.Generator]:
            # the partition's own first draw (it only reads the labels): the sites are cut from the patients it
            # leaves, and the generator goes on to cut them
            rng = np.random.default_rng(seed)
            return choose_holdout(values[column], y, frac, rng), rng

        for seed in self.grid.seed:
            held, _ = held_out(seed)
            if not held.any():
                raise ExperimentError(f"[experiment] holdout-frac = {frac}: with seed = {seed}, every {column!r} group "
                                      f"of {labels} is larger than that share of its class (data {data!r}), so no "
                                      "patient is held out; raise [experiment] holdout-frac")
            fed = ~held
            for spec, kind, arg in specs:
                for n in counts:
                    where = (f"[grid] sites = {n} with partition {spec!r}, seed = {seed} (data {data!r}): {labels} "
                             f"has {int(fed.sum())} patients besides the {int(held.sum())} held out")
                    if kind == "by":
                        have = len(set(values[arg][fed]))
                        if n > have:
                            raise ExperimentError(f"{where}, with {have} distinct {arg!r} values, fewer than the "
                                                  f"sites; lower [grid] sites (per data set: sites = {{ {data} = "
                                                  f"[{have}] }})")
                    elif n * least > fed.sum():  # an iid split has no minimum of its own: 35 sites of 6230 gave 178
                        raise ExperimentError(f"{where}, fewer than [grid] sites = {n} x [experiment] "
                                              f"min-site-patients = {least} = {n * least} patients; lower [grid] "
                                              "sites or [experiment] min-site-patients")
                    elif kind == "dirichlet":  # the cell's own draw (a few milliseconds): its refusal named CLI flags
                        _, rng = held_out(seed)
                        try:
                            assign_dirichlet(y[fed], schema.n_classes, n, arg, rng, least)
                        except PartitionError:
                            raise ExperimentError(f"{where}: no Dirichlet draw gives every site [experiment] "
                                                  f"min-site-patients = {least}; use a larger alpha, fewer [grid] "
                                                  "sites or a lower min-site-patients") from None


def parse_partition(spec: str) -> tuple[str, Any]:
    """'iid' | 'dirichlet:ALPHA' | 'by:COLUMN' (or a bare column name such as center8)."""
    if spec == "iid":
        return "iid", None
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = -1
        if alpha <= 0:
            raise ValueError(f"partition {spec!r}: give a positive alpha, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    column = spec.split(":", 1)[1] if spec.startswith("by:") else spec
    if not re.fullmatch(r"[A-Za-z0-9_]+", column):
        raise ValueError(f"partition {spec!r}: use iid, dirichlet:ALPHA or by:COLUMN (a labels column, e.g. center8)")
    return "by", column


def _known_keys(err: dict) -> str:
    """For a misspelt key (pydantic's extra_forbidden): the keys its section has, the fix a reader needs."""
    if err.get("type") != "extra_forbidden":
        return ""
    model: Any = ExperimentConfig
    for part in err["loc"][:-1]:
        field = model.model_fields.get(str(part).replace("-", "_")) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    where = f"[{'.'.join(map(str, err['loc'][:-1]))}]" if len(err["loc"]) > 1 else "the config"
    return f" (a misspelling? {where} has: {', '.join(f.alias or n for n, f in model.model_fields.items())})"


def data_dir(name: str) -> tuple[Path, Path]:
    from simulations.baseline import COHORTS, SHARED_DATA, SHARED_DATA_ENV

    if name not in COHORTS:
        raise ExperimentError(f"[grid] data: unknown data set {name!r}; use {', '.join([*COHORTS, 'synthetic'])}")
    path, schema = COHORTS[name]
    if not path.is_dir():
        where = (f"the {name} cohort lives in the consortium's shared data folder, ../shared/data beside the checkout: "
                 f"set {SHARED_DATA_ENV} to the folder holding it") if path.is_relative_to(SHARED_DATA) else \
            f"the {name} cohort is part of the checkout: restore it with git"
        raise ExperimentError(f"[grid] data {name!r}: {path} not found ({where})")
    return path, schema


# --- cells -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    data: str
    partition: str
    sites: int  # by:COLUMN partitions pack the column's values into this many sites (all values: one each)
    seed: int
    method: str  # "federated" or a baseline
    strategy: str = ""
    privacy: str = ""  # "off" or the per-site epsilon as text

    @property
    def part_key(self) -> str:
        return _slug(f"{self.data}-{self.partition}-{self.sites}-s{self.seed}")

    @property
    def id(self) -> str:
        tail = f"{self.strategy}-eps{self.privacy}" if self.method == "federated" else self.method
        return _slug(f"{self.part_key}-{tail}")

    def describe(self) -> dict:
        return {"cell": self.id, "data": self.data, "partition": self.partition, "sites": self.sites,
                "strategy": self.strategy or None, "privacy": self.privacy or None, "seed": self.seed,
                "method": self.method}


def epsilon_text(epsilon: float) -> str:
    """The per-site epsilon as a cell names it: short ("8", "0.5") where that reads back as the same number, the
    exact repr otherwise, so two budgets never share a cell (f"{e:g}" makes 1.0000001 and 1 both "1")."""
    short = f"{epsilon:g}"
    return short if float(short) == float(epsilon) else repr(float(epsilon))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """Federated cells first (grid order), then each partition's baselines once."""
    out: list[Cell] = []
    parts = []
    for data in cfg.grid.data:
        for spec in cfg.grid.for_data(data, "partition"):
            for n, seed in itertools.product(cfg.grid.for_data(data, "sites"), cfg.grid.seed):
                parts.append((data, spec, n, seed))
    for data, spec, n, seed in parts:
        for strategy, privacy in itertools.product(cfg.grid.strategy, cfg.grid.privacy):
            out.append(Cell(data, spec, n, seed, "federated", strategy,
                            "off" if privacy == "off" else epsilon_text(privacy)))
    for (data, spec, n, seed), method in itertools.product(parts, cfg.baselines.methods):
        out.append(Cell(data, spec, n, seed, method))
    return out


# --- partitions --------------------------------------------------------------------------------------------
SYNTHETIC_HOLDOUT_PATIENTS = 400  # the held-out site's patients when [synthetic] leaves holdout-patients out


def synthetic_config(cfg: ExperimentConfig, cell: Cell):
    """The generator's settings for a synthetic cell: [synthetic], with sites, alpha and seed from the cell's grid
    values and min-site-patients from [experiment] (check() refuses them in [synthetic])."""
    from simulations.synthetic import SyntheticConfig

    kind, arg = parse_partition(cell.partition)
    fields = {"holdout_patients": SYNTHETIC_HOLDOUT_PATIENTS, **{k.replace("-", "_"): v for k, v in cfg.synthetic.items()}}
    return SyntheticConfig(**{**fields, "sites": cell.sites, "alpha": 1e4 if kind == "iid" else arg, "seed": cell.seed,
                              "min_site_patients": cfg.experiment.min_site_patients})


def partition_settings(cfg: ExperimentConfig, cell: Cell) -> dict:
    """Every setting that shapes a cell's partition (its sites and held-out patients)."""
    if cell.data == "synthetic":
        return {"data": "synthetic", **asdict(synthetic_config(cfg, cell))}
    kind, arg = parse_partition(cell.partition)
    e = cfg.experiment
    settings = {"data": cell.data, kind: arg, "sites": cell.sites, "seed": cell.seed,
                "holdout_column": e.holdout_column, "holdout_frac": e.holdout_frac}
    if kind == "dirichlet":  # the only split it shapes: an iid or by:COLUMN partition is the same whatever it says
        settings["min_site_patients"] = e.cohort_min_site_patients()
    return settings


def partition_dir(cfg: ExperimentConfig, cell: Cell, root: Path) -> Path:
    """RESULTS/partitions/<part_key>-<hash of partition_settings>: a partition is reused only under the settings
    it was made with (a key of the grid values alone handed an old [synthetic] or hold-out's sites to a new config)."""
    digest = hashlib.sha256(json.dumps(partition_settings(cfg, cell), sort_keys=True).encode()).hexdigest()[:10]
    return root / "partitions" / f"{cell.part_key}-{digest}"


def ensure_cell_partition(cfg: ExperimentConfig, cell: Cell, root: Path) -> tuple[Path, Path, dict]:
    """(federation dir, schema path, manifest): made once per data x partition x sites x seed and the settings
    that shape it."""
    from shared_models.schema import FeatureSchema
    from simulations.partition import partition_cohort
    from simulations.synthetic import generate_federation

    fed = partition_dir(cfg, cell, root)
    if not (fed / "manifest.json").exists():
        shutil.rmtree(fed, ignore_errors=True)
        fed.parent.mkdir(parents=True, exist_ok=True)
        kind, arg = parse_partition(cell.partition)
        if cell.data == "synthetic":
            if kind == "by":
                raise ExperimentError(f"partition {cell.partition!r}: synthetic data has no site column; use iid or "
                                      "dirichlet:ALPHA")
            generate_federation(fed, synthetic_config(cfg, cell))
        else:
            path, schema_path = data_dir(cell.data)
            e = cfg.experiment
            partition_cohort(path, FeatureSchema.load(schema_path), fed, sites=cell.sites,
                             by=arg if kind == "by" else None, dirichlet=arg if kind == "dirichlet" else None,
                             iid=kind == "iid", seed=cell.seed, holdout_column=e.holdout_column,
                             holdout_frac=e.holdout_frac, min_site_patients=e.cohort_min_site_patients())
    manifest = json.loads((fed / "manifest.json").read_text())
    if not manifest.get("holdout"):
        raise ExperimentError(f"{fed}: the partition has no held-out patients to evaluate on")
    schema = fed / "schema.json" if cell.data == "synthetic" else data_dir(cell.data)[1]
    return fed, schema, manifest


# --- running a cell ----------------------------------------------------------------------------------------
def run_cell(cfg: ExperimentConfig, cell: Cell, root: Path, log=print) -> list[dict]:
    fed, schema_path, manifest = ensure_cell_partition(cfg, cell, root)
    work = root / "cells" / cell.id
    shutil.rmtree(work, ignore_errors=True)  # a cell left unfinished starts again from scratch
    work.mkdir(parents=True)
    write_json_atomic(work / "cell.json", cell.describe())
    t0 = time.time()
    if cell.method == "federated":
        rows = _run_federated(cfg, cell, fed, schema_path, manifest, work, log)
    else:
        rows = _run_baseline(cfg, cell, fed, schema_path, manifest, work)
    base = {"experiment": cfg.experiment.name, **cell.describe(),
            "epsilon_target": None if cell.privacy in ("", "off") else float(cell.privacy)}
    rows = [{c: {**base, **r}.get(c) for c in COLUMNS} for r in rows]
    done = {"seconds": round(time.time() - t0, 1), "rows": rows}
    if cell.method in TRANSFORMER_BASELINES:  # which recipe's model the baseline trained
        done["model"] = {"recipe": "no-dp (dp = false)", **baseline_model_config(cfg).model_dump(by_alias=True)}
    write_json_atomic(work / "rows.json", done)
    return rows


def _run_federated(cfg, cell, fed, schema_path, manifest, work, log) -> list[dict]:
    from simulations.federation import federation_config, load_installed, run_federation, site_model_dir

    n = len(manifest["sites"])
    dp = cell.privacy != "off"
    holdout = fed / manifest["holdout"]["dir"]
    run_cfg = federation_config(work, fed, n, rounds=cfg.experiment.rounds, dp=dp,
                                epsilon=float(cell.privacy) if dp else 8.0, secagg=bool(cfg.run.get("secagg", True)),
                                strategy=cell.strategy, seed=cell.seed, local_epochs=cfg.experiment.local_epochs,
                                eval_data=holdout, schema=schema_path, extra=cfg.run)
    (work / "flower").mkdir()
    result = run_federation(work / "flower", run_cfg, n_sites=n, stream=_RoundEcho(log))
    rows = []
    for r in metrics_lines(work / "server" / METRICS):
        se, g = r.get("server_eval") or {}, r.get("global") or {}
        rows.append({"round": r["round"], "site": "held-out", "patients": manifest["holdout"]["patients"],
                     **_metrics(se), "seconds": r.get("seconds")})
        rows.append({"round": r["round"], "site": "global", **_metrics(g)})
        eps = r.get("site_epsilon", {})
        fit = {str(s.get("site")): s for s in r.get("sites", {}).values() if "site" in s}
        for site, m in sorted((r.get("site_eval") or {}).items()):
            rows.append({"round": r["round"], "site": site, "patients": int(m.get("patients", 0)), **_metrics(m),
                         "epsilon_spent": eps.get(site) if dp else None})
        for site in sorted(set(fit) - set(r.get("site_eval") or {})):  # trained but no evaluation this round
            rows.append({"round": r["round"], "site": site, "epsilon_spent": eps.get(site) if dp else None})
    installed = [d for d in result["deliveries"] if d.get("installed")]
    if not installed:
        raise ExperimentError(f"cell {cell.id}: no site installed the final model; " + why_no_model(work))
    model, schema, _ = load_installed(site_model_dir(run_cfg, manifest, installed[0]["site"]))
    final_evaluation(model, schema, fed, manifest, work)
    from simulations.privacy_audit import audit_cell

    audit_cell(work, fed, manifest, run_cfg)  # each site attacks the delivered model: the report's audit table
    return rows


def why_no_model(work: Path) -> str:
    """What the server recorded of a cell's rounds when no site got a model, and where the sites say why: a site's
    own reason (its data, too few patients for a held-out part) stays in its log, the simulation's flwr-run.log."""
    from server.checkpoint import why_no_update
    from server.run_files import FLWR_LOG

    log_file = work / "flower" / FLWR_LOG
    try:
        records = metrics_lines(work / "server" / METRICS)
    except (OSError, json.JSONDecodeError):
        records = []
    trained = [r for r in records if r.get("participants")]
    if not records or trained:
        return f"see {log_file}"
    return (f"no round of {len(records)} aggregated any site's update ({why_no_update(records)}). The sites' own "
            f"reasons are in {log_file} (look for 'failed validation' and 'refuses'); sites too "
            "small for a held-out part (about a fifth of a site's patients, half of it for the normalisation under "
            "DP) are the usual cause: fewer [grid] sites or more patients per site")


class _RoundEcho:
    """Passes the server's 'round N done' lines through, indented, as the cell's progress."""

    def __init__(self, log):
        self.log = log

    def write(self, line: str) -> None:
        m = re.search(r"round \d+ done:.*", line)
        if m:
            self.log("    " + m.group(0).strip())

    def flush(self) -> None:
        pass


def _metrics(m: dict) -> dict:
    return {k: m.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}


# --- baselines ---------------------------------------------------------------------------------------------
def _site_sets(schema, fed: Path, manifest: dict):
    from shared_models.site_data import load_labelled_site

    sites = {s["name"]: load_labelled_site(schema, fed / s["dir"]) for s in manifest["sites"]}
    return sites, load_labelled_site(schema, fed / manifest["holdout"]["dir"])


def _concat(sets):
    from shared_models.site_data import SiteDataset

    sets = list(sets)
    return SiteDataset(ids=[i for s in sets for i in s.ids], x=np.concatenate([s.x for s in sets]),
                       y=np.concatenate([s.y for s in sets]),
                       modality_present=np.concatenate([s.modality_present for s in sets]),
                       feature_missing=np.concatenate([s.feature_missing for s in sets]))


def _take(ds, idx):
    from shared_models.site_data import SiteDataset

    return SiteDataset(ids=[ds.ids[i] for i in idx], x=ds.x[idx], y=ds.y[idx], modality_present=ds.modality_present[idx],
                       feature_missing=ds.feature_missing[idx])


def val_split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices; a class with fewer than 3 patients stays in training."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) >= 3:
            val.extend(idx[: max(1, round(frac * len(idx)))])
    val = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), val), val


def baseline_model_config(cfg: ExperimentConfig, source: str = "run config"):
    """The model the transformer baselines train: the run config resolved with dp = false, as a no-DP cell resolves
    it. The baselines train without DP and are set beside the no-DP cells; resolved with the project's default
    dp = true, "auto" settings (modality-dropout) would take the DP recipe's values instead. dp-mode says where
    DP's noise is added, moot without DP ('distributed' is refused with dp = false)."""
    from privacy.run_config import load_run_config

    return load_run_config({**cfg.run_config(), "dp": False, "dp-mode": "site"}, source=source).model


def train_transformer(schema, train, cfg: ExperimentConfig, seed: int):
    """The federation's model (the run section's model settings, as a no-DP cell resolves them), trained centrally
    with early stopping on a stratified 15% of its training patients."""
    import torch

    from shared_models.model import MultiModalTransformer

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = MultiModalTransformer(schema, baseline_model_config(cfg))
    fit_early_stopped(model, *train.tensors(), seed)
    return model.eval()


def fit_early_stopped(model, x, y, seed: int):
    """The centralized recipe (`TrainConfig` defaults: up to 60 epochs, patience 15) with early stopping
    on a stratified 15% of the rows (x, y: tensors); returns shared_models.training's FitResult."""
    import torch

    from shared_models.training import TrainConfig, fit

    tr, va = (torch.from_numpy(i) for i in val_split(y.numpy(), 0.15, seed))
    return fit(model, x[tr], y[tr], TrainConfig(seed=seed), *((x[va], y[va]) if len(va) else (None, None)))


def _score(model, ds) -> dict:
    import torch

    from shared_models.evaluation import evaluate

    m = evaluate(model, torch.from_numpy(ds.x), torch.from_numpy(ds.y))
    return {"patients": m.n, "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "macro_f1": m.macro_f1}


def _logistic(schema, train, test, seed: int) -> dict:
    from shared_models.evaluation import classification_metrics
    from simulations.baseline import fit_logistic, lr_features

    tr, va = val_split(train.y, 0.15, seed)
    a, b = _take(train, tr), _take(train, va)
    clf, _, _ = fit_logistic(lr_features(schema, a), a.y, lr_features(schema, b), b.y, schema.n_classes, seed=seed)
    m = classification_metrics(test.y, clf.predict(lr_features(schema, test)), schema.n_classes)
    return {"patients": len(test.y), **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}


def _run_baseline(cfg, cell, fed, schema_path, manifest, work) -> list[dict]:
    from shared_models.schema import FeatureSchema

    schema = FeatureSchema.load(schema_path)
    sites, holdout = _site_sets(schema, fed, manifest)
    pooled = _concat(sites.values())
    t0 = time.time()
    if cell.method == "pooled":
        model = train_transformer(schema, pooled, cfg, cell.seed)
        final_evaluation(model, schema, fed, manifest, work)
        return [{"site": "held-out", **_score(model, holdout), "seconds": round(time.time() - t0, 1)}]
    if cell.method == "logistic":
        return [{"site": "held-out", **_logistic(schema, pooled, holdout, cell.seed), "seconds": round(time.time() - t0, 1)}]
    if cell.method == "local":
        return [{"site": name, **_score(train_transformer(schema, ds, cfg, cell.seed), holdout)}
                for name, ds in sites.items()]
    if cell.method == "local-logistic":
        return [{"site": name, **_logistic(schema, ds, holdout, cell.seed)} for name, ds in sites.items()]
    if cell.method == "pooled-cv":
        from sklearn.model_selection import StratifiedKFold

        rows = []
        y = pooled.y
        # Classes with fewer members than folds cannot be stratified: they are spread by the splitter anyway.
        folds = StratifiedKFold(cfg.baselines.cv_folds, shuffle=True, random_state=cell.seed)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            splits = list(folds.split(np.zeros(len(y)), y))
        for k, (tr, te) in enumerate(splits):
            model = train_transformer(schema, _take(pooled, tr), cfg, cell.seed + k)
            rows.append({"site": f"fold-{k}", **_score(model, _take(pooled, te))})
        rows.append({"site": "mean", "patients": len(y), **{m: float(np.mean([r[m] for r in rows])) for m in
                                                            ("accuracy", "balanced_accuracy", "macro_f1")},
                     "seconds": round(time.time() - t0, 1)})
        return rows
    raise ExperimentError(f"unknown baseline {cell.method!r}; use one of {', '.join(METHODS)}")


# --- the final model's held-out predictions (for the report) ------------------------------------------------
MIN_PATTERN_PATIENTS = 30  # held-out patients with a modality pattern for the report to give its accuracy
def final_evaluation(model, schema, fed: Path, manifest: dict, work: Path) -> None:
    """predictions.npz (held-out patients + a sample of each site's, for the 2-D map) and final.json
    (held-out metrics, mean modality attention, macro-F1 with each modality removed)."""
    import torch

    from shared_models.evaluation import classification_metrics
    from shared_models.site_data import load_labelled_site

    parts = []
    rng = np.random.default_rng(0)
    hold_dir = fed / manifest["holdout"]["dir"]
    hold = load_labelled_site(schema, hold_dir)
    parts.append(("held-out", hold, np.arange(len(hold.y)), hold_dir))
    for s in manifest["sites"]:
        ds = load_labelled_site(schema, fed / s["dir"])
        idx = np.sort(rng.permutation(len(ds.y))[:TSNE_SITE_SAMPLE])
        parts.append((s["name"], ds, idx, fed / s["dir"]))
    out: dict[str, list] = {k: [] for k in ("y", "proba", "fused", "modality_weights", "present", "split", "site",
                                            "age", "gender")}
    for name, ds, idx, d in parts:
        x = torch.from_numpy(ds.x[idx])
        e = _explain(model, x)
        out["y"].append(ds.y[idx])
        out["proba"].append(torch.softmax(e["logits"], 1).numpy().astype(np.float32))
        out["fused"].append(e["fused"].numpy().astype(np.float32))
        out["modality_weights"].append(np.nan_to_num(e["modality_weights"].numpy()).astype(np.float32))
        out["present"].append(e["present"].numpy())
        out["split"].append(np.array(["held-out" if name == "held-out" else "site"] * len(idx)))
        age, gender, group = _demographics(d, [ds.ids[i] for i in idx], schema)
        out["site"].append(group if name == "held-out" else np.array([name] * len(idx)))
        out["age"].append(age)
        out["gender"].append(gender)
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays = {k: np.asarray(v, dtype=str) if v.dtype == object else v for k, v in arrays.items()}
    np.savez_compressed(work / "predictions.npz", classes=np.array(schema.classes), modalities=np.array(
        schema.modality_names), **arrays)
    hx = torch.from_numpy(hold.x)
    base = classification_metrics(hold.y, _explain(model, hx)["logits"].argmax(1).numpy(), schema.n_classes)
    layout = schema.layout()
    ablation = {}
    for m in schema.modality_names:
        x = hx.clone()
        x[:, layout.slices[m]] = float("nan")
        ablation[m] = classification_metrics(hold.y, _explain(model, x)["logits"].argmax(1).numpy(),
                                             schema.n_classes)["macro_f1"]
    held = arrays["split"] == "held-out"
    w, p = arrays["modality_weights"][held], arrays["present"][held]
    from client.calibration import pattern_outcomes  # the measurement sites and `serve calibrate` make

    patterns = pattern_outcomes(model, schema, hold.x, hold.y, MIN_PATTERN_PATIENTS, reportable=False)
    write_json_atomic(work / "final.json", {
        "held_out": {"patients": int(len(hold.y)), **{k: base[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}},
        "modality_weight_mean": {m: float(w[p[:, j], j].mean()) if p[:, j].any() else None
                                 for j, m in enumerate(schema.modality_names)},
        "modality_ablation": ablation,
        "modality_patterns": {k: {"patients": n, "accuracy": round(right / n, 4)} for k, (n, right) in patterns.items()}})


def _explain(model, x, batch: int = 512) -> dict:
    parts = [model.explain(x[i: i + batch]) for i in range(0, len(x), batch)]
    import torch

    return {k: torch.cat([p[k] for p in parts]) for k in ("logits", "fused", "modality_weights", "present")}


def _demographics(site_dir: Path, ids: list[str], schema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Age (years), gender and source-site code per patient, read from the raw tables (gender may be
    kept out of the model's features; it is still a subgroup to report)."""
    import pandas as pd

    from shared_models.site_data import LABELS_STEM, find_table, read_table

    def column(stem: str, names: tuple[str, ...]) -> pd.Series | None:
        for path in find_table(site_dir, stem):
            df = read_table(path, schema.id_column)
            for n in names:
                if n in df.columns:
                    return df[n].reindex(ids)
        return None

    age = column("clinical", ("age", "age_at_diagnosis", "age_at_initial_pathologic_diagnosis"))
    gender = column("clinical", ("gender", "sex"))
    group = column(LABELS_STEM, ("tss",))
    n = len(ids)
    years = pd.to_numeric(age, errors="coerce").to_numpy(np.float64) if age is not None else np.full(n, np.nan)
    if np.isfinite(years).any() and np.nanmedian(years) > 150:
        years = years / 365.25  # GDC's age_at_diagnosis is in days (the BRCA cohort's clinical table)
    return (years,
            np.asarray(gender.fillna("").astype(str).str.lower(), dtype=str) if gender is not None else np.full(n, ""),
            np.asarray(group.fillna("held-out").astype(str), dtype=str) if group is not None else np.full(n, "held-out"))


# --- the grid ---------------------------------------------------------------------------------------------
def run_experiment(config_path: str | Path, results: str | Path, log=print, only: str | None = None) -> Path:
    cfg = ExperimentConfig.load(config_path)
    try:
        pattern = re.compile(only) if only is not None else None
    except re.error as e:
        raise ExperimentError(f"--only {only!r}: not a regular expression ({e}); give one that matches cell ids, "
                              "e.g. --only 'fedavg-eps8' or --only 'pooled|logistic'") from None
    root = Path(results)
    if root.exists() and not root.is_dir():
        raise ExperimentError(f"--out {root}: is a file; give a results directory (a new one, or one this config "
                              "wrote before)")
    previous = root / "experiment.toml"
    try:  # (a fresh file system's lost+found and hidden files are not another tool's output)
        held = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "lost+found") \
            if root.is_dir() and not previous.exists() else []
    except OSError as e:
        raise ExperimentError(f"--out {root}: cannot be read ({e.strerror}); give a results directory this account "
                              "can read and write") from None
    if held:
        # another tool's directory (a simulate --out, a report): the grid's cells/ and results would land among its files
        raise ExperimentError(f"--out {root}: holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''} but no "
                              "experiment.toml, so it is not an experiment's results directory; give a new --out (or "
                              "one an experiment wrote before)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExperimentError(f"--out {root}: cannot make the results directory ({e.strerror}); give another "
                              "--out") from None
    text = Path(config_path).read_text()
    if previous.exists() and (before := _previous_config(previous)) != cfg:
        changed = [k for k in ExperimentConfig.model_fields
                   if k != "grid" and (before is None or getattr(before, k) != getattr(cfg, k))]
        finished = sorted(root.glob("cells/*/rows.json"))
        if changed and finished:
            # a finished cell is skipped by its id, which names only its grid values: its rows would be another
            # configuration's, mixed into the results without a trace. With no finished cell there is nothing
            # to mix: the new config replaces the old, and so deleting cells/ is a fix that works.
            what = ", ".join(f"[{k}]" for k in changed) if before else "settings (it no longer reads as a config)"
            raise ExperimentError(
                f"{root}: {len(finished)} cell(s) finished under {previous}, whose {what} differ from "
                f"{config_path}'s; the results would mix two configurations. Use another --out, or delete "
                f"{root / 'cells'} to run every cell again under the new configuration")
        log(f"note: no cell finished under {previous}; {config_path} replaces it" if changed else
            f"note: {previous}'s grid differs from {config_path}'s; finished cells are kept, new cells are added")
    write_text_atomic(previous, text)
    for note in cfg.unused_settings():
        log(f"note: {note}")
    todo = [c for c in cells(cfg) if pattern is None or pattern.search(c.id)]
    if not todo:  # a misspelt --only ran nothing and said only "0 cells"
        ids = [c.id for c in cells(cfg)]
        log(f"--only {only!r} matches none of the {len(ids)} cells, so none runs; their ids: "
            + ", ".join(ids[:6]) + (", ..." if len(ids) > 6 else ""))
    t_all = time.time()
    for i, cell in enumerate(todo, 1):
        done = root / "cells" / cell.id / "rows.json"
        if done.exists():
            finished, why = cell_rows(done)
            if finished is not None:
                log(f"[{i}/{len(todo)}] {cell.id}: done before, skipped")
                continue
            log(f"[{i}/{len(todo)}] {done}: {why}, so the cell is not done; it runs again")
        log(f"[{i}/{len(todo)}] {cell.id} ...")
        t0 = time.time()
        rows = run_cell(cfg, cell, root, log)
        held = [r for r in rows if r["site"] in ("held-out", "mean")]
        last = held[-1] if held else None
        what = "cross-validated macro-F1 (inside the pool)" if last and last["site"] == "mean" else "held-out macro-F1"
        summary = f"{what} {last['macro_f1']:.3f}" if last and last["macro_f1"] is not None else f"{len(rows)} rows"
        log(f"[{i}/{len(todo)}] {cell.id}: {summary} ({time.time() - t0:.0f} s)")
        write_results(root, cfg)
    write_results(root, cfg)
    log(f"{len(todo)} cells in {time.time() - t_all:.0f} s; results in {root / 'results.csv'}")
    return root


def _previous_config(path: Path) -> ExperimentConfig | None:
    """The config a results directory was written under, None if it no longer reads as one."""
    try:
        return ExperimentConfig.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError):
        return None


def cell_rows(path: Path) -> tuple[list[dict] | None, str | None]:
    """A finished cell's rows (its rows.json) and None; or None and why the file is not a finished cell's
    (missing, cut short by a full disk, edited by hand)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not readable as JSON ({e})"
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and r.keys() <= set(COLUMNS) for r in rows):
        return None, "holds no list of result rows under \"rows\""
    return rows, None


def write_results(root: Path, cfg: ExperimentConfig) -> None:
    """results.csv / results.json from every finished cell of this config (in grid order)."""
    rows = []
    for cell in cells(cfg):
        rows.extend(cell_rows(root / "cells" / cell.id / "rows.json")[0] or [])
    write_json_atomic(root / "results.json", {"experiment": cfg.model_dump(by_alias=True), "rows": rows})
    with atomic_file(root / "results.csv", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


__all__ = ["ExperimentConfig", "ExperimentError", "run_experiment", "cells", "write_results"]
