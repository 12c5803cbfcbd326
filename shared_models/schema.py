"""The consortium contract: which modalities, features and classes exist.

A `FeatureSchema` is the one source of truth that every site and the server agree on. It is saved
as JSON; its content hash (of what the model and the data pipeline read, descriptions left out) is
stamped on every set of model weights so that weights trained under one schema are never loaded
under another.

Layout of the flat model input derived from a schema (see `FeatureSchema.layout`): modalities in
schema order, each modality's features in schema order, concatenated into one float vector per
patient. Missing values are NaN; a categorical value is the index of its level (as a float).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared_models.files import write_text_atomic

SCHEMA_FORMAT = "oncofed-schema/1"
# the file names a site's table may have, after its modality's name (shared_models/site_data.py reads them)
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz", ".txt.gz", ".parquet.gz")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# The fields only people read (`oncofed schema show`, the service's model description, reports), never the model or
# the data pipeline: left out of `FeatureSchema.content_hash`, so a corrected description keeps every model,
# checkpoint, normalisation and ledger entry of the schema valid. Every other field is hashed: a field added to
# FeatureSchema or Modality is part of the contract unless listed here.
DESCRIPTIVE_FIELDS = frozenset({"name", "version", "description"})  # of FeatureSchema
DESCRIPTIVE_MODALITY_FIELDS = frozenset({"description"})  # of each Modality


class SchemaError(ValueError):
    """A schema file or object that cannot be used; the message names the field and the fix."""


class ModalityKind(str, Enum):
    omics = "omics"  # high-dimensional continuous features (expression, methylation, ...)
    tabular = "tabular"  # structured columns: numeric, categorical or binary


class ColumnType(str, Enum):
    numeric = "numeric"
    categorical = "categorical"
    binary = "binary"


class Transform(str, Enum):
    none = "none"
    log1p = "log1p"  # x -> log(1 + x) on numeric (not binary) columns, for counts; values must be > -1


class Modality(BaseModel):
    """One data type, stored at each site as one table named `<name>.<csv|tsv|parquet>[.gz]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="identifier, also the table's file stem at every site")
    kind: ModalityKind
    features: list[str] = Field(min_length=1, description="ordered feature (column) names")
    column_types: dict[str, ColumnType] = Field(
        default_factory=dict,
        description="tabular only: type of each column; a column not listed is numeric",
    )
    levels: dict[str, list[str]] = Field(
        default_factory=dict, description="tabular only: ordered levels of each categorical column"
    )
    transform: Transform = Transform.none
    standardize: bool = Field(
        default=True,
        description="z-score numeric features with statistics fitted on the site's patients (client/site.py)",
    )
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"modality name {v!r} must start with a letter or digit and contain only letters, "
                "digits, '_', '-' or '.' (it is also the site table's file name)"
            )
        if v.lower().endswith(TABLE_SUFFIXES):
            stem = v[: len(v) - max(len(x) for x in TABLE_SUFFIXES if v.lower().endswith(x))]
            raise ValueError(f"modality name {v!r} ends in a table's file extension: name the modality {stem!r} "
                             f"(its table is then {stem}.csv, .tsv or .parquet)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Modality":
        dupes = _duplicates(self.features)
        if dupes:
            raise ValueError(f"modality {self.name!r}: duplicate feature names {dupes[:5]}; make them unique")
        if blank := [f for f in self.features if not f.strip() or f != f.strip()]:
            raise ValueError(f"modality {self.name!r}: feature names {blank[:5]} are empty or begin or end with "
                             "spaces; a table's column header must match them exactly: trim them")
        if self.kind is ModalityKind.omics:
            if self.column_types or self.levels:
                raise ValueError(
                    f"modality {self.name!r}: 'column_types' and 'levels' are for tabular modalities; "
                    "remove them or set kind to 'tabular'"
                )
            return self
        known = set(self.features)
        unknown = [c for c in self.column_types if c not in known]
        if unknown:
            raise ValueError(f"modality {self.name!r}: column_types names columns not in features: {unknown[:5]}")
        for col, typ in self.column_types.items():
            if typ is ColumnType.categorical:
                lv = self.levels.get(col)
                if not lv:
                    raise ValueError(
                        f"modality {self.name!r}: categorical column {col!r} needs its levels: add "
                        f'"levels": {{"{col}": ["level1", "level2", ...]}}'
                    )
                if _duplicates(lv):
                    raise ValueError(f"modality {self.name!r}: column {col!r} has duplicate levels {_duplicates(lv)}")
        stray = [c for c in self.levels if self.column_types.get(c) is not ColumnType.categorical]
        if stray:
            raise ValueError(
                f"modality {self.name!r}: levels given for non-categorical columns {stray[:5]}; "
                "set their column_types to 'categorical' or remove the levels"
            )
        return self

    def column_type(self, feature: str) -> ColumnType:
        if self.kind is ModalityKind.omics:
            return ColumnType.numeric
        return self.column_types.get(feature, ColumnType.numeric)

    @property
    def categorical_columns(self) -> list[str]:
        return [f for f in self.features if self.column_type(f) is ColumnType.categorical]

    @property
    def n_features(self) -> int:
        return len(self.features)


class FeatureSchema(BaseModel):
    """Modalities, features and classes shared by the whole consortium."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["oncofed-schema/1"] = SCHEMA_FORMAT
    name: str = Field(min_length=1)
    version: str = Field(default="1", min_length=1)
    id_column: str = Field(default="patient", min_length=1)
    label_column: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2, description="ordered class labels; the model's output order")
    modalities: list[Modality] = Field(min_length=1)
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureSchema":
        if _duplicates(self.classes):
            raise ValueError(f"classes: duplicate labels {_duplicates(self.classes)}; list each class once")
        if blank := [c for c in self.classes if not c.strip() or c != c.strip()]:
            raise ValueError(f"classes: labels {blank} are empty or begin or end with spaces; a label in the "
                             "labels table must match exactly: trim them")
        if self.id_column == self.label_column:
            raise ValueError(f"id_column and label_column are both {self.id_column!r}: the patient id and the class "
                             "must be two columns")
        for m in self.modalities:
            for column, what in ((self.label_column, "label_column"), (self.id_column, "id_column")):
                if column in m.features:
                    raise ValueError(f"modality {m.name!r} lists {column!r}, the schema's {what}, as a feature"
                                     + (": the model would read the answer it must predict" if what == "label_column"
                                        else ": it identifies the patient, it is not a measurement")
                                     + "; remove it from the features")
        names = [m.name for m in self.modalities]
        if _duplicates(names):
            raise ValueError(f"modalities: duplicate names {_duplicates(names)}; each modality needs its own name")
        if "labels" in names:
            raise ValueError("modalities: 'labels' is reserved for the labels table; rename that modality")
        return self

    # --- derived facts --------------------------------------------------------------------
    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"schema {self.name!r} has no modality {name!r}; it has {[m.name for m in self.modalities]}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def layout(self) -> "InputLayout":
        slices, start = {}, 0
        for m in self.modalities:
            slices[m.name] = slice(start, start + m.n_features)
            start += m.n_features
        return InputLayout(slices=slices, n_inputs=start)

    def canonical_json(self) -> str:
        """The whole schema, descriptions included, as compact JSON with sorted keys."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        """SHA-256 of what the model and the data pipeline read (`DESCRIPTIVE_FIELDS` left out): a change to the
        columns, their order, types, levels, transforms, the classes or the id and label columns changes it; a
        description, the schema's name or its version does not."""
        content = self.model_dump(mode="json", exclude={
            **dict.fromkeys(DESCRIPTIVE_FIELDS, True), "modalities": {"__all__": set(DESCRIPTIVE_MODALITY_FIELDS)}})
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def legacy_content_hash(self) -> str:
        """The hash weights, checkpoints, normalisations, model packages and privacy ledgers written before
        `content_hash` left the descriptive fields out carry: the SHA-256 of `canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def accepted_hashes(self) -> tuple[str, str]:
        """The hashes an artefact of this schema may carry: `content_hash` (what every artefact is written with)
        first, then `legacy_content_hash` (artefacts written before)."""
        return self.content_hash(), self.legacy_content_hash()

    def matches(self, stored_hash: object) -> bool:
        """Whether an artefact stamped with `stored_hash` was made under this schema: every check of a stored
        schema hash asks this, so an artefact with the legacy hash of the same schema file is accepted too."""
        return isinstance(stored_hash, str) and (stored_hash == self.content_hash()
                                                 or stored_hash == self.legacy_content_hash())

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.model_dump(mode="json"), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSchema":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SchemaError(f"{path}: schema file not found; pass the consortium's schema JSON") from None
        except OSError as e:
            raise SchemaError(f"{path}: cannot read the schema file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise SchemaError(f"{path}: not a text file (schema files are UTF-8 JSON)") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if other := not_a_schema(path, raw):
            raise SchemaError(other)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: object, source: str = "schema") -> "FeatureSchema":
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise SchemaError(format_validation_error(e, source, raw)) from None


# OncoFed's other JSON files, by their "format": what a person passing one as the schema holds instead
OTHER_FILES = {"site": "a site's settings (site.json)", "consortium": "a consortium's manifest (consortium.json)",
               "model-package": "a model version's package manifest (package.json)",
               "normalizer": "a site's input normalisation", "privacy-ledger": "a site's privacy ledger"}


def not_a_schema(path: Path, raw: object) -> str:
    """Why `raw` (read from `path`) is another OncoFed file than a schema, and where the schema is ("" if it is none
    of OncoFed's other files): its fields would otherwise read as a schema's every problem ("fix: remove it")."""
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("oncofed-") or fmt == SCHEMA_FORMAT:
        return ""
    kind = fmt.removeprefix("oncofed-").split("/")[0]
    what = OTHER_FILES.get(kind, f"an OncoFed {kind} file")
    if kind == "site" and isinstance(raw.get("schema"), str):
        where = f"the schema this site trains with is its `schema`: {path.parent / raw['schema']}"
    elif found := next((c for c in (path.parent / "schema.json", path.parent / "trust" / "schema.json",
                                    path.parent / "public" / "schema.json") if c.is_file()), None):
        where = f"the schema beside it is {found}"
    else:
        where = ("the consortium's schema is schema.json in its public/ bundle (in a site directory trust/schema.json, "
                 "which `oncofed site init` copied)")
    return f"{path}: not a schema but {what} (\"format\": {json.dumps(fmt)}); {where}"


@dataclass(frozen=True)
class InputLayout:
    """Where each modality sits in the flat model input vector."""

    slices: dict[str, slice]
    n_inputs: int


def _duplicates(items: list[str]) -> list[str]:
    seen, dupes = set(), []
    for x in items:
        if x in seen and x not in dupes:
            dupes.append(x)
        seen.add(x)
    return dupes


def _location(loc: tuple, raw: object) -> str:
    """Render a pydantic error location with modality names instead of bare indices."""
    parts, node = [], raw
    for key in loc:
        if isinstance(key, int):
            label = f"[{key}]"
            if isinstance(node, list) and 0 <= key < len(node) and isinstance(node[key], dict) and "name" in node[key]:
                label = f"[{key}] ({node[key]['name']!r})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(key))
        try:
            node = node[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "(top level)"


_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it (unknown field; check its spelling)",
    "enum": "use one of the allowed values",
    "literal_error": "use the allowed value",
    "too_short": "give at least the minimum number of entries",
    "string_too_short": "give a non-empty string",
    "list_type": "give a JSON list",
    "dict_type": "give a JSON object",
    "string_type": "give a string",
    "bool_type": "give true or false",
    "model_type": "give a JSON object",
}


def format_validation_error(err: ValidationError, source: str, raw: object) -> str:
    lines = [f"{source}: invalid schema ({err.error_count()} problem{'s' if err.error_count() != 1 else ''}):"]
    for e in err.errors():
        where = _location(e["loc"], raw)
        msg = e["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(e["type"])
        lines.append(f"  - {where}: {msg}" + (f"; fix: {fix}" if fix else ""))
    return "\n".join(lines)
