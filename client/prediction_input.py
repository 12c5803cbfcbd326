"""The input contract of predictions: what the site service and `oncofed predict` score, and what they refuse.

JSON payloads and uploaded tables go through the same checks with the same messages
(`shared_models.validation.check_prediction_tables`, the rules a training site's tables are held to),
then through the patient checks here, which work on the raw matrix whatever its source:

- refused (422): a patient with no usable feature; coverage (share of the schema's features present)
  below the site's minimum; values far outside the site's training distribution when the site asks
  for that (`serve.refuse-out-of-range`);
- flagged in the answer: coverage per modality, low coverage, values far outside the training
  distribution (more than `serve.out-of-range-sd` standard deviations from the normaliser's mean).

Limits (413 / 422, each naming the limit and the setting that raises it): patients per request,
decompressed bytes of uploaded tables (counted while decompressing, not after), JSON nesting depth,
problems listed in one answer.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from privacy.site_config import ServeSettings
from shared_models.schema import ColumnType, FeatureSchema
from shared_models.site_data import TABLE_SUFFIXES
from shared_models.validation import FLOAT32_MAX, Problem, check_prediction_tables, read_prediction_table
from shared_models.validation.hints import id_mismatch_hint
from shared_models.validation.messages import MAX_NAMES


class PredictionInputError(ValueError):
    """Input the model cannot score honestly: each problem names patient, modality, feature or row."""

    def __init__(self, problems: list[dict], status: int = 422):
        self.problems, self.status = problems, status
        super().__init__("; ".join(f"{p['loc']}: {p['msg']}" for p in problems[:10]))


class InputTooLarge(PredictionInputError):
    def __init__(self, loc: str, msg: str):
        super().__init__([{"loc": loc, "code": "too_large", "msg": msg}], status=413)


@dataclass
class CheckedPatients:
    ids: list[str]
    raw: np.ndarray  # (patients, n_inputs) float32, schema layout, transforms applied
    notes: list[dict]  # per patient: coverage per modality, out-of-range values, warnings
    warnings: list[dict]  # about the input as a whole (e.g. columns that are not features, ignored)


# --- what the contract reads of a model ----------------------------------------------------------------
class ModalityInputs(dict):
    """feature -> (column, kind, levels) of one modality (kind "cat": level -> code, "log": log1p, "bin": 0/1,
    "num"), with what a whole row of it needs at once: `col` (feature -> column), and for modalities without
    categorical features (`numeric_only`) `is_log` and `is_bin` over its columns (offset from `start`), and the
    columns of the last key order a client sent (`order`)."""

    def __init__(self, start: int, feats: dict):
        super().__init__(feats)
        self.start = start
        self.col = {f: spec[0] for f, spec in feats.items()}
        kinds = [spec[1] for spec in feats.values()]
        self.numeric_only = "cat" not in kinds
        self.is_log = np.array([k == "log" for k in kinds], dtype=bool)
        self.is_bin = np.array([k == "bin" for k in kinds], dtype=bool)
        self.order = None  # (keys in a client's order, their columns, log and binary positions): _fill_numeric


def input_map(schema: FeatureSchema) -> dict:
    """Where each feature of a JSON payload goes: modality -> ModalityInputs."""
    from shared_models.schema import Transform

    layout, out = schema.layout(), {}
    for m in schema.modalities:
        start, feats = layout.slices[m.name].start, {}
        for j, f in enumerate(m.features):
            t = m.column_type(f)
            if t is ColumnType.categorical:
                feats[f] = (start + j, "cat", {lvl: k for k, lvl in enumerate(m.levels[f])})
            elif m.transform is Transform.log1p and t is ColumnType.numeric:
                feats[f] = (start + j, "log", None)
            elif t is ColumnType.binary:
                feats[f] = (start + j, "bin", None)
            else:
                feats[f] = (start + j, "num", None)
        out[m.name] = ModalityInputs(start, feats)
    return out


def feature_names(schema: FeatureSchema) -> list[tuple[str, str]]:
    return [(m.name, f) for m in schema.modalities for f in m.features]


def features_present(lm, observed: np.ndarray) -> np.ndarray:
    """(patients, modalities): how many of each modality's features each patient has (observed: the model inputs'
    ~isnan; lm: anything with modality_bounds' `modality_starts`)."""
    return np.add.reduceat(observed, lm.modality_starts, axis=1, dtype=np.int64)


def modality_bounds(schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray]:
    """Each modality's first column and its number of features, in the schema's order."""
    layout = schema.layout()
    return (np.array([layout.slices[m.name].start for m in schema.modalities], np.intp),
            np.array([m.n_features for m in schema.modalities], np.float64))


@dataclass
class ContractModel:
    """What the contract reads of a loaded model: `client.predict.LoadedModel` has the same attributes; this
    is the model-free form a process that only checks inputs builds (client/input_process.py)."""
    schema: FeatureSchema
    normalizer: object  # shared_models.site_data.Normalizer
    inputs: dict = None
    feature_at: list = None
    modality_starts: np.ndarray = None
    modality_sizes: np.ndarray = None

    def __post_init__(self):
        self.inputs = input_map(self.schema)
        self.feature_at = feature_names(self.schema)
        self.modality_starts, self.modality_sizes = modality_bounds(self.schema)


def problem_dict(p: Problem, modality: str | None = None) -> dict:
    out = {"loc": p.where, "code": p.code, "msg": p.message, "fix": p.fix}
    if modality:
        out["modality"] = modality
    if p.column is not None:
        out["feature"] = p.column
    if p.rows:
        out["patients"] = list(p.rows)
    return out


UNITS_MIN_VALUES = 10  # a modality's unit is judged on at least this many standardised values of a patient
# A modality narrower than that (a clinical table's age, one mutation burden) is judged value by value: beyond
# NARROW_UNITS_SD the value is in another unit (age in days or months for years: ~1,600 or ~50 SD). The sites' own
# and the held-out hospitals' patients reach 4.8 SD at most there (`python benchmarks/units_check.py RUN --narrow`).
NARROW_UNITS_SD = 20.0
# Another log base (log10 or ln exported for log2) multiplies every value by a constant, drawing the values toward
# 0, not away from the site's mean: the |z| test above misses it. A patient's slope against the site's mean
# profile shows it, where that profile varies enough across features (its SD over the features, in within-feature
# SDs, at least PROFILE_MIN: miRNA 3.5-3.7 at the main job's sites, copy number and RPPA 0.26-0.60).
# `python benchmarks/units_check.py RUN --slopes` (docs/results.md): miRNA slopes of real patients 0.75-1.09
# (0.1st-99.9th percentile, own and held-out hospitals), ln for log2 0.52-0.76, log10 for log2 0.21-0.35
PROFILE_MIN = 2.0
SLOPE_WARN = (0.76, 1.25)  # outside: flagged `units_scale`
SLOPE_REFUSE = (0.5, 2.0)  # outside: refused (`units`)
# A slope is judged only on at least half of a modality's standardised features: a panel of the most variable miRNAs
# (what a hospital's targeted assay measures) scatters the slopes of correct patients (`python benchmarks/units_check.py
# RUN --panels`: the 10 most variable of 513 refused 7-23% of the sites' own patients, the 100 most variable 0.3-2%,
# the 257 most variable none).
SLOPE_MIN_SHARE = 0.5
# The slope and the shift leave out a patient's values beyond this many SDs (one typed 1000 among log2 values would set a
# least-squares slope alone); they were measured so (docs/results.md), whatever serve.out-of-range-sd flags.
LEAVE_OUT_SD = 6.0
# A modality whose standardised values barely vary across its features sits on the site's mean profile: filled in
# (imputed with a mean or median), not measured. The sites' own patients' SD of z over a modality's features is at
# least 0.27 (copy number; miRNA 0.50, RPPA 0.39); a median fill gives 0.09-0.28, a mean fill 0 (`python
# benchmarks/units_check.py RUN --imputed`): below IMPUTED_SD the answer is flagged `imputed_modality`.
IMPUTED_SD = 0.25
# Another normalisation (every value shifted by a constant) moves a patient's mean signed z. Where the profile is flat
# (copy number, RPPA) real patients' means stay within +-0.6 (0.1st-99.9th percentile, own and held-out hospitals,
# `python benchmarks/units_check.py RUN --shifts`) and a shift of 0.5 moves them to 0.61-3.09: beyond SHIFT_WARN the
# answer is flagged `units_shift`. Where it varies (miRNA) real patients reach 5.3 (a type's overall level): no
# threshold separates a shift there, which only the |z| test catches once it is large.
SHIFT_WARN = 1.0
MAX_TEXT = 300  # characters of one text in a problem (an id or feature name may be megabytes long)


def _short(v):
    if isinstance(v, str) and len(v) > MAX_TEXT:
        return f"{v[:MAX_TEXT]}... ({len(v):,} characters)"
    if isinstance(v, (list, tuple)):
        return [_short(x) for x in v]
    return v


def capped(problems: list[dict], limit: int) -> list[dict]:
    """At most `limit` problems, then a count; each text at most MAX_TEXT characters, so an answer stays small
    whatever the request held."""
    out = [{k: _short(v) for k, v in p.items()} for p in problems[:limit]]
    if len(problems) <= limit:
        return out
    return out + [{"loc": "request", "code": "more_problems",
                   "msg": f"{len(problems) - limit} more problems not listed (at most {limit} per "
                          "answer: serve.max-problems in site.json)"}]


# --- JSON ----------------------------------------------------------------------------------------------
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { outside strings, without parsing (a parser recurses)."""
    brackets = np.frombuffer(_STRING.sub(b'""', body), dtype=np.uint8)
    step = np.zeros(256, np.int8)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    moves = step[brackets]
    return int(np.cumsum(moves[moves != 0], dtype=np.int64).max(initial=0))


def object_depth(value) -> int:
    """Deepest nesting of lists and dicts in a parsed value, iteratively (13 ms for the serve benchmark's
    6.4 MB request of 300 patients, against 91 ms for json_depth's scan of the same bytes)."""
    if not isinstance(value, (dict, list)):
        return 0
    best, stack = 0, [(value, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > best:
            best = depth
        for v in (x.values() if isinstance(x, dict) else x):
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
    return best


def _check_depth(depth: int, limits: ServeSettings) -> None:
    if depth > limits.max_json_depth:
        raise PredictionInputError([{"loc": "body", "code": "too_deep", "msg": f"JSON nested {depth} levels deep; "
                                     f"at most {limits.max_json_depth} (a prediction request needs 5)"}])


# orjson (3.8) recurses once per nesting level: a 292 KB body nested 150,000 deep crashed the whole process
# (segfault) in a parsing thread. A body with at most this many brackets cannot nest deeper than that, 7x
# below the crash; the serve benchmark's 300-patient request has ~1,800.
ORJSON_SAFE_BRACKETS = 20_000


def parse_json(body: bytes, limits: ServeSettings):
    """The request body as Python objects, refusing nesting beyond the limit. The bracket count bounds the
    depth: a body with more than ORJSON_SAFE_BRACKETS has its depth scanned from its bytes before any
    parser sees it; any other body is parsed by orjson first and its depth read from the result (cheaper),
    or, if orjson refuses it (NaN literals, huge integers, lone surrogates), scanned before json, which
    recurses."""

    brackets = body.count(b"[") + body.count(b"{")  # C speed; an upper bound on the depth
    may_nest = brackets > limits.max_json_depth
    scanned = brackets > ORJSON_SAFE_BRACKETS
    if scanned:
        _check_depth(json_depth(body), limits)
    try:  # ~3x faster than json
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if may_nest and not scanned:
            _check_depth(object_depth(value), limits)
        # a key given twice in one object: the parser keeps the last value, which would be a guess. Every member
        # is a '"' then optional whitespace then ':', so their count (plus any inside strings) is at least the
        # members'; equal to the keys parsed, no key repeats. Otherwise the body is parsed again to say which
        spaced = any(q in body for q in (b'" ', b'"\n', b'"\t', b'"\r')) and len(_SPACED_COLON.findall(body))
        if body.count(b'":') + spaced != object_keys(value):
            _refuse_duplicate_keys(body)
        return value
    if may_nest and not scanned:
        _check_depth(json_depth(body), limits)
    return _refuse_duplicate_keys(body)


_SPACED_COLON = re.compile(rb'"[ \t\r\n]+:')


def object_keys(value) -> int:
    """Keys of every object in a parsed value, iteratively."""
    keys, stack = 0, [value]
    pop, push = stack.pop, stack.append
    while stack:
        x = pop()
        if type(x) is dict:
            keys += len(x)
            x = x.values()
        elif type(x) is not list:  # a top-level scalar (null, 1, true): no keys; the body's check refuses it
            continue
        for v in x:
            if type(v) is dict or type(v) is list:
                push(v)
    return keys


def _refuse_duplicate_keys(body: bytes):
    """The body parsed by json with every object's members seen in order: a key given twice is refused."""
    import json

    def members(pairs: list) -> dict:
        out = dict(pairs)
        if len(out) < len(pairs):
            seen: set = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise PredictionInputError([{"loc": "body", "code": "duplicate_key",
                                         "msg": f"the key {_short(twice)!r} appears twice in one object: which "
                                                "value is meant cannot be told", "fix": "send each key once"}])
        return out
    try:
        return json.loads(body, object_pairs_hook=members)
    except (ValueError, RecursionError) as e:
        if isinstance(e, PredictionInputError):
            raise
        raise PredictionInputError([{"loc": "body", "code": "not_json", "msg": f"not JSON ({e})"}]) from None


BODY_KEYS = frozenset({"patients", "top_k"})  # a /v1/predict body's members
PATIENT_KEYS = frozenset({"id", "modalities"})  # a patient's


def unknown_keys(obj: dict, known: frozenset, loc: str) -> list[dict]:
    """A problem per key of `obj` outside `known`, naming the closest valid spelling: a misspelt key ("topk",
    "modalites") dropped silently answers as if it were absent (the default top_k, every modality missing)."""
    if obj.keys() <= known:
        return []
    from shared_models.spelling import closest_key

    out = []
    for key in [k for k in obj if k not in known][:MAX_NAMES]:  # a few named: the CPU a body can cost stays bounded
        close = closest_key(key, known)
        out.append({"loc": f"{loc}.{_short(key)}", "code": "unknown_key",
                    "msg": f"unknown key {_short(key)!r}" + (f"; did you mean {close!r}?" if close else ""),
                    "fix": f"write {close!r}" if close else f"remove it: the keys here are {', '.join(sorted(known))}"})
    return out


def parse_request(body: bytes, limits: ServeSettings) -> tuple[list, int]:
    """A /v1/predict body -> (patients, top_k), or the 422 that says what is wrong."""
    data = parse_json(body, limits)
    if isinstance(data, dict) and (unknown := unknown_keys(data, BODY_KEYS, "body")):
        raise PredictionInputError(unknown)
    patients = data.get("patients") if isinstance(data, dict) else None
    top_k = data.get("top_k", 5) if isinstance(data, dict) else 5
    if not isinstance(patients, list) or not patients:
        raise PredictionInputError([{"loc": "body.patients", "code": "no_patients",
                                     "msg": "a non-empty list of patients is required"}])
    check_top_k(top_k, "body.top_k")
    return patients, top_k


MAX_TOP_K = 50  # the most features an explanation names


def check_top_k(top_k, loc: str) -> None:
    """The one rule for top_k, a JSON request's and an upload's alike: refused, never clamped."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_K:
        raise PredictionInputError([{"loc": loc, "code": "bad_top_k", "msg": f"an integer from 0 to {MAX_TOP_K}",
                                     "fix": f"ask for 0 (no explanation) to {MAX_TOP_K} features"}])


# "top_k": N as the first or the last member of the body's top-level object (the two places clients put it)
_TOP_K_FIRST = re.compile(rb'\A\s*\{\s*"top_k"\s*:\s*(\d+)\s*[,}]')
_TOP_K_LAST = re.compile(rb',\s*"top_k"\s*:\s*(\d+)\s*\}\s*\Z')


def asks_explanations(body: bytes) -> bool:
    """Whether a /v1/predict body asks for explanations, read from its first and last 64 bytes without parsing
    it (a 300-patient body takes ~40 ms of the service's GIL to parse). Only a hint for routing the request:
    whoever answers parses the body and its top_k in full. A body whose top_k sits elsewhere reads as no
    (the service then parses it and routes on the parsed value)."""
    found = _TOP_K_FIRST.match(body[:64]) or _TOP_K_LAST.search(body[-64:])
    return found is not None and int(found.group(1)) > 0


def estimated_patients(body: bytes) -> int | None:
    """An upper bound on a JSON body's patients for queue admission, without parsing: every patient the
    contract accepts has a "modalities" member, spelt out unless the body uses \\u escapes (then None: the
    body must be parsed to be counted)."""
    if b"\\u" in body:
        return None
    return max(1, body.count(b'"modalities"'))


def json_frames(schema: FeatureSchema, patients: list, inputs: dict, limits: ServeSettings
                ) -> tuple[np.ndarray | None, list[str], dict, list[dict]]:
    """Patients of a JSON payload -> (raw matrix or None, ids, frames, structural problems).

    The raw matrix is built directly when every value is a plain in-range number or a known level and
    every id is unique (the common case, and fast); anything else returns None and the per-modality
    frames, which `check_prediction_tables` reads exactly as uploaded tables (the same messages)."""
    problems: list[dict] = []
    n_inputs = schema.layout().n_inputs
    raw = np.full((len(patients), n_inputs), np.nan, dtype=np.float32)
    ids: list[str] = []
    records: dict[str, list[tuple[str, dict]]] = {}
    fast = True
    for i, p in enumerate(patients):
        loc = f"patients[{i}]"
        if not isinstance(p, dict):
            problems.append({"loc": loc, "code": "not_a_patient", "msg": "must be an object with 'id' and 'modalities'"})
            continue
        if unknown := unknown_keys(p, PATIENT_KEYS, loc):
            problems.extend(unknown)
            continue
        pid = p.get("id")
        if pid is None or (isinstance(pid, str) and pid.strip() == ""):
            problems.append({"loc": f"{loc}.id", "code": "empty_id", "msg": "each patient needs an 'id' (text)"})
            continue
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            # a number beyond 64 bits arrives as a float: its digits are no longer the id that was sent
            problems.append({"loc": f"{loc}.id", "code": "bad_id", "msg": f"an id must be text or a whole number "
                             f"(got {type(pid).__name__} {_short(repr(pid))})", "fix": "send the id as text: \"P001\""})
            continue
        pid = str(pid).strip()
        if bad := id_problem(pid):
            problems.append({"loc": f"{loc}.id", "code": "bad_id", **bad})
            continue
        ids.append(pid)
        mods = p.get("modalities")
        if mods is None:
            mods = {}
        if not isinstance(mods, dict):
            problems.append({"loc": f"{loc}.modalities", "code": "not_an_object", "patients": [pid],
                             "msg": "must be an object: modality -> {feature: value}"})
            continue
        row = raw[len(ids) - 1]
        for mname, feats in mods.items():
            fmap = inputs.get(mname)
            mloc = f"{loc}.modalities.{mname}"
            if fmap is None:
                problems.append({"loc": mloc, "code": "unknown_modality", "patients": [pid], "modality": str(mname),
                                 "msg": f"unknown modality; the schema has {', '.join(inputs)}"})
                continue
            if feats is None:
                continue
            if not isinstance(feats, dict):
                problems.append({"loc": mloc, "code": "not_an_object", "patients": [pid], "modality": mname,
                                 "msg": "must be an object of feature: value"})
                continue
            if len(feats) > 2 * len(fmap):  # necessarily mostly foreign keys: refused without building a table
                unknown = [f for f in feats if f not in fmap]
                problems.append({"loc": mloc, "code": "foreign_columns", "patients": [pid], "modality": mname,
                                 "msg": f"{len(unknown):,} of the {len(feats):,} keys are not {mname!r} features "
                                        f"(e.g. {unknown[:3]}); the modality has {len(fmap):,}",
                                 "fix": f"send the schema's {mname!r} features only"})
                continue
            records.setdefault(mname, []).append((pid, feats))
            if fast:
                fast = _fill_row(row, fmap, feats)
    if len(set(ids)) < len(ids):  # across the request: two entries of one patient may carry other modalities
        counts = Counter(ids)
        dups = [i for i, n in counts.items() if n > 1]
        problems.append({"loc": "body.patients", "code": "duplicate_ids", "patients": dups[:MAX_NAMES],
                         "msg": f"{len(dups)} patient id(s) more than once: "
                                f"{', '.join(f'{i} (x{counts[i]})' for i in dups[:MAX_NAMES])}",
                         "fix": "send each patient once, with all of its modalities in one entry; which entry is "
                                "the patient cannot be guessed, so nothing is scored"})
    frames = {}
    if not fast or problems:
        for mname, recs in records.items():
            # JSON true/false as a table's cell would spell them: a number column refuses them as text, as it
            # refuses the same cell in a CSV (pandas would read a bool as 1/0)
            rows = [{f: ("true" if v is True else "false" if v is False else v) for f, v in r.items()}
                    if any(type(v) is bool for v in r.values()) else r for _, r in recs]
            df = pd.DataFrame.from_records(rows, index=pd.Index([i for i, _ in recs], dtype=object),
                                           coerce_float=False)
            frames[mname] = (df, f"modalities.{mname}")
    return (raw[:len(ids)] if fast and not problems else None), ids, frames, problems


_NUMBER_OR_NULL = {int, float, type(None)}  # exactly: bool and numpy scalars are not JSON numbers
VECTOR_MIN = 8  # a modality with at least this many values is filled with array operations


def _fill_row(row: np.ndarray, fmap, feats: dict) -> bool:
    """Write a modality's values into the row; False at the first value the fast path does not decide.

    `fmap` is the modality's ModalityInputs. The values are collected and written with one
    indexed assignment: per-element writes into a numpy row cost ~0.1 us each. A modality without
    categorical features and with at least VECTOR_MIN values is checked and transformed with array
    operations (the same decisions; py-spy at 16 connections found the per-value loop in 21% of the event
    loop's GIL samples)."""
    if fmap.numeric_only and len(feats) >= VECTOR_MIN:
        return _fill_numeric(row, fmap, feats)
    cols, vals = [], []
    for f, v in feats.items():
        spec = fmap.get(f)
        if spec is None:
            return False
        if v is None:
            continue
        col, kind, levels = spec
        if kind == "cat":
            code = levels.get(v) if isinstance(v, str) else None
            if code is None:
                return False
            cols.append(col)
            vals.append(code)
            continue
        if type(v) not in (int, float) or not -FLOAT32_MAX <= v <= FLOAT32_MAX:  # also NaN and bool
            return False
        if kind == "log":
            if v <= -1:
                return False
            v = math.log1p(v)
        elif kind == "bin" and v != 0 and v != 1:
            return False
        cols.append(col)
        vals.append(v)
    if cols:
        row[cols] = vals  # float64 -> float32 rounds as an element-wise write does
    return True


def _fill_numeric(row: np.ndarray, fmap, feats: dict) -> bool:
    """_fill_row's decisions for a modality of numeric and binary features, on arrays.

    The columns of a key order are looked up once and kept on `fmap` (`fmap.order`): a client sends its
    features in one order, so the lookup of ~500 keys is a tuple comparison from the second request on.
    Nulls stay NaN through every step (the row starts as NaN), so they are never filtered out."""
    from operator import itemgetter

    keys = tuple(feats)
    order = fmap.order
    if order is None or order[0] != keys:
        try:
            cols = np.array(itemgetter(*keys)(fmap.col), dtype=np.intp)
        except KeyError:  # a foreign feature
            return False
        at = cols - fmap.start
        order = fmap.order = (keys, cols, np.flatnonzero(fmap.is_log[at]), np.flatnonzero(fmap.is_bin[at]))
    _, cols, log, binary = order
    vals = list(feats.values())
    types = set(map(type, vals))
    if not types <= _NUMBER_OR_NULL:
        return False
    try:
        v = np.array(vals, dtype=np.float64)  # None -> NaN
    except OverflowError:  # an integer beyond float64
        return False
    if float in types and int(np.isnan(v).sum()) != vals.count(None):  # a NaN value, not a null
        return False
    # NaN (a null) compares False. An integer just beyond the float32 range can round onto its edge in
    # float64: values on the edge are compared exactly as sent.
    edge = np.abs(v) >= FLOAT32_MAX
    if edge.any() and not all(-FLOAT32_MAX <= vals[i] <= FLOAT32_MAX for i in np.flatnonzero(edge)):
        return False
    if len(log):
        lv = v[log]
        if (lv <= -1).any():
            return False
        v[log] = np.log1p(lv)
    if len(binary):
        bv = v[binary]
        if not ((bv == 0) | (bv == 1) | (bv != bv)).all():
            return False
    row[cols] = v  # float64 -> float32 rounds as an element-wise write does; a null writes the row's NaN
    return True


# --- tables --------------------------------------------------------------------------------------------
class DecompressedBudget:
    """Bytes written after decompression, over every table of one request, and rows of delimited tables."""

    def __init__(self, limits: ServeSettings):
        self.left = int(limits.max_decompressed_mb * 1024 * 1024)
        self.limit_mb, self.max_rows = limits.max_decompressed_mb, limits.max_patients

    def spend(self, n: int, name: str) -> None:
        self.left -= n
        if self.left < 0:
            raise InputTooLarge(name, f"the uploaded tables decompress to more than {self.limit_mb:g} MB "
                                      "(serve.max-decompressed-mb in site.json); send fewer patients per upload")


def store_upload(chunks, dest: Path, budget: DecompressedBudget, max_rows: int) -> int:
    """Write an uploaded table to `dest` (without .gz), decompressing gzip as it streams; stops at the budget.

    `chunks` yields the bytes as uploaded. Delimited tables are also stopped at `max_rows` data rows.
    Returns an upper bound on the table's data rows (its lines but the header; a Parquet file's rows)."""
    name = dest.name
    gz = name.lower().endswith(".gz")
    target = dest.with_name(name[:-3]) if gz else dest
    delimited = not target.name.lower().endswith(".parquet")
    inflate = zlib.decompressobj(wbits=31) if gz else None
    lines = 0
    try:
        out = open(target, "xb")
    except FileExistsError:  # two uploads of one name (or NAME and NAME.gz): the second must not replace the first
        raise PredictionInputError([{
            "loc": name, "code": "ambiguous_table",
            "msg": f"a second uploaded file for the table {target.name!r}: which to score would be a guess",
            "fix": "send one table per modality"}]) from None
    with out:
        for chunk in chunks:
            pieces = [chunk]
            if inflate is not None:
                pieces = []
                data = chunk
                while data:
                    try:  # at most 1 MiB at a time: a bomb never expands whole
                        piece = inflate.decompress(data, 1 << 20)
                    except zlib.error as e:
                        raise PredictionInputError([{"loc": name, "code": "unreadable", "msg": f"not a gzip file ({e})",
                                                     "fix": "upload it without the .gz ending if it is not "
                                                            "compressed, or compress it again"}]) from None
                    budget.spend(len(piece), name)
                    pieces.append(piece)
                    data = inflate.unconsumed_tail
                    if inflate.eof and inflate.unused_data:  # a second gzip member
                        rest = inflate.unused_data
                        inflate = zlib.decompressobj(wbits=31)
                        data = rest
                    out.write(piece)
                    if delimited:
                        lines += piece.count(b"\n")
                        if lines > max_rows + 1:
                            _too_many_rows(name, max_rows)
                continue
            budget.spend(len(chunk), name)
            out.write(chunk)
            if delimited:
                lines += chunk.count(b"\n")
                if lines > max_rows + 1:
                    _too_many_rows(name, max_rows)
        if inflate is not None and not inflate.eof:
            raise PredictionInputError([{"loc": name, "code": "unreadable", "msg": "the gzip stream is incomplete",
                                         "fix": "upload the file again (the copy was cut short)"}])
    if not delimited:
        return _check_parquet(target, budget, max_rows)
    return max(lines, 1)


def _too_many_rows(name: str, max_rows: int):
    raise InputTooLarge(name, f"more than {max_rows} patients (rows) in one request (serve.max-patients in "
                              "site.json); split the upload")


def _check_parquet(path: Path, budget: DecompressedBudget, max_rows: int) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # noqa: BLE001 - read_table reports the unreadable file with its fix
        return 1
    if meta.num_rows > max_rows:
        _too_many_rows(path.name, max_rows)
    budget.spend(sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), path.name)
    return max(meta.num_rows, 1)


_INVISIBLE = ("Cc", "Cf")  # Unicode's control and format (zero-width) characters: never part of an id as read


def id_problem(pid: str) -> dict | None:
    """Why a patient id cannot be one ({"msg", "fix"}), or None: a lone UTF-16 surrogate (JSON's "\\ud800" escape,
    no character: it cannot be written to the audit log) or an invisible or control character (a zero-width
    space pasted with it: the id would be another patient's, character by character)."""
    try:
        pid.encode("utf-8")
    except UnicodeEncodeError:
        return {"msg": f"the id {pid.encode('utf-8', 'backslashreplace').decode()!r} holds a lone UTF-16 surrogate, "
                       "which is no character", "fix": "send the id as the text it is (UTF-8 JSON)"}
    if bad := next(((i, ch) for i, ch in enumerate(pid) if unicodedata.category(ch) in _INVISIBLE), None):
        i, ch = bad
        return {"msg": f"the id {pid!r} holds an invisible or control character (U+{ord(ch):04X} at position {i + 1})",
                "fix": "remove it: ids are compared character by character, so it would name another patient"}
    return None


def ambiguous_ids(ids: list[str]) -> dict | None:
    """A problem when two different ids of one request are written alike (letter case, or another Unicode form of
    the same letters, as 'José' composed or decomposed): one patient twice or two patients, which cannot be told."""
    seen: dict[str, str] = {}
    alike: list[tuple[str, str]] = []
    for pid in dict.fromkeys(ids):
        key = unicodedata.normalize("NFC", pid).casefold()
        if (other := seen.setdefault(key, pid)) != pid:
            alike.append((other, pid))
    if not alike:
        return None
    pairs = ", ".join(f"{a!r} and {b!r}" for a, b in alike[:MAX_NAMES])
    return {"loc": "ids", "code": "ambiguous_ids", "patients": [b for _, b in alike[:MAX_NAMES]],
            "msg": f"{len(alike)} pair(s) of ids written alike (letter case or Unicode form): {pairs}; one patient "
                   "twice or two patients cannot be told apart, so nothing is scored",
            "fix": "write each patient's id one way, and send each patient once"}


def table_frames(schema: FeatureSchema, table_dir: Path) -> tuple[dict, list[dict]]:
    """Modality tables of a directory -> frames for the contract; other files are reported, not read."""
    frames, problems = {}, []
    names = {m.name for m in schema.modalities}
    for path in sorted(table_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = next((s for s in names if any(path.name == s + suf for suf in TABLE_SUFFIXES)), None)
        if stem is None:
            fix = (f"name each table after its modality: {', '.join(sorted(names))} (.csv, .tsv, .parquet, "
                   "optionally .gz)")
            lower = path.name.lower()
            if any(lower == s + suf for s in names for suf in TABLE_SUFFIXES):
                fix = f"names are matched in lower case: rename it {lower}"
            elif lower.endswith((".xlsx", ".xls", ".ods")):
                fix = "spreadsheet workbooks are not read: save the sheet as CSV (comma-separated) named after its modality"
            problems.append({"loc": path.name, "code": "unrelated_file", "severity": "warning",
                             "msg": "not a table of this schema's modalities; ignored", "fix": fix})
            continue
        if stem in frames:
            problems.append({"loc": path.name, "code": "ambiguous_table",
                             "msg": f"a second table for modality {stem!r} (also {frames[stem][1]})",
                             "fix": "send one table per modality"})
            continue
        df, read_problems = read_prediction_table(schema, path)
        if df is not None:
            frames[stem] = (df, path.name)
        problems += [problem_dict(p, stem) for p in read_problems]
    if not frames and not any(p.get("severity") != "warning" for p in problems):
        # the files that were not read, each with its own fix (a name's case, a workbook): the refusal carries them
        unread = [f"{p['loc']}: {p['fix']}" for p in problems if p.get("code") == "unrelated_file" and p.get("fix")]
        problems.append({"loc": "files", "code": "no_modality", "msg": "no modality table: name each file after "
                         f"its modality ({', '.join(m.name for m in schema.modalities)})",
                         "fix": "; ".join(unread[:5]) if unread else "send one table per modality, named after it "
                         "(e.g. expr.csv), as csv, tsv or parquet"})
    return frames, problems


def tables_apart(frames: dict) -> dict | None:
    """Tables of one upload that share no patient: each row would be scored as a patient of its table alone.
    Refused when the ids differ in a systematic way (longer ids, letter case: the same patients written
    differently); otherwise a warning, as they may be different patients."""
    if len(frames) < 2:
        return None
    ids = [(pd.Index(df.index.astype(str)), file) for df, file in frames.values()]
    if any(len(a.intersection(b)) for i, (a, _) in enumerate(ids) for b, _ in ids[i + 1:]):
        return None
    hint, refuse = None, False
    for a, fa in ids:
        for b, fb in ids:
            if a is not b and hint is None and (h := id_mismatch_hint(a, b, reference=fb)):
                hint = f"{fa}: {h}"
                # refused only when written alike most of them meet: P10, P11 against P1, P2 are other patients
                n = int(b.str.len().value_counts().idxmax())
                written = a.str[:n] if "longer" in h else a.str.upper()
                alike = written.isin(b if "longer" in h else b.str.upper())
                refuse = float(alike.mean()) >= 0.8 and written.is_unique
    files = ", ".join(file for _, file in ids)
    return {"loc": files, "code": "no_common_patients", **({} if refuse else {"severity": "warning"}),
            "msg": f"no patient id appears in more than one table ({files}): each row is scored as a patient "
                   "with that table's data alone",
            "fix": hint or "if these are the same patients, write their ids the same way in every table"}


_SEPARATORS = re.compile(r"[-._]")


def _id_key(pid: str) -> str:
    """An id as a person reads it: compatibility form (a full-width dash is a dash), case folded, no invisible
    characters, every dash one dash."""
    text = unicodedata.normalize("NFKC", pid).casefold()
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE)
    return re.sub(r"[\u2010-\u2015\u2212]", "-", text).strip()


def ids_written_differently(frames: dict) -> dict | None:
    """Tables of one upload that share patients, and also hold ids that are another table's written differently
    (another case or Unicode form, a longer sample id such as TCGA-2J-AAB4-01A for TCGA-2J-AAB4): each such
    patient would be scored twice, from half its data each time, and nothing says so. Refused, naming pairs."""
    if len(frames) < 2:
        return None
    tables = [(set(map(str, df.index)), file) for df, file in frames.values()]
    pairs: list[tuple[str, str, str, str]] = []
    for i, (a, fa) in enumerate(tables):
        for b, fb in tables[i + 1:]:
            only_a, only_b = a - b, b - a
            if not only_a or not only_b:
                continue
            whole, heads = {}, {}  # the key of an id of b alone, and each of its prefixes at a separator -> the id
            for pid in only_b:
                key = _id_key(pid)
                whole.setdefault(key, pid)
                for m in _SEPARATORS.finditer(key):
                    heads.setdefault(key[:m.start()], pid)
            for pid in sorted(only_a):
                key = _id_key(pid)  # the same id written another way, a's id cut short of b's, or b's of a's
                other = whole.get(key) or heads.get(key) or next(
                    (whole[key[:m.start()]] for m in _SEPARATORS.finditer(key) if key[:m.start()] in whole), None)
                if other is not None:
                    pairs.append((pid, fa, other, fb))
    if not pairs:
        return None
    shown = "; ".join(f"{p!r} ({fa}) and {o!r} ({fb})" for p, fa, o, fb in pairs[:MAX_NAMES])
    return {"loc": ", ".join(sorted({fa for _, fa, _, _ in pairs} | {fb for _, _, _, fb in pairs})),
            "code": "ids_written_differently", "patients": [p for p, *_ in pairs[:MAX_NAMES]],
            "msg": f"{len(pairs)} patient id(s) of one table seem to be another table's written differently: {shown}; "
                   "each would be scored twice, from part of its data each time, so nothing is scored",
            "fix": "write each patient's id the same way in every table (the patient id, not a sample id)"}


def profile_spread(norm, a: int, b: int) -> float:
    """How much a modality's training means vary across its features (checked columns a:b): their SD over the
    features, in within-feature SDs."""
    return float(np.std(norm.checked_mean[a:b]) / np.median(norm.checked_scale[a:b]))


def _profile_blocks(norm, values: np.ndarray, leave_out: np.ndarray | None, keep):
    """(modality, its columns a:b, the patients' values there, which are used, how many per patient) for the
    modalities wide enough to judge whose training-mean profile's spread (profile_spread) passes `keep`. `leave_out`
    (like `values`): values not used (the service's: beyond LEAVE_OUT_SD)."""
    for m, a, b in norm.checked_groups:
        if b - a < UNITS_MIN_VALUES or not keep(profile_spread(norm, a, b)):
            continue
        block = values[:, a:b]
        seen = ~np.isnan(block) if leave_out is None else ~np.isnan(block) & ~leave_out[:, a:b]
        yield m, a, b, block, seen, seen.sum(axis=1)


def profile_slopes(norm, x: np.ndarray, profile_min: float = PROFILE_MIN,
                   leave_out: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """(modality, each patient's slope of its values against the site's training means; NaN with fewer than
    UNITS_MIN_VALUES values or SLOPE_MIN_SHARE of the modality's) for the modalities whose mean profile varies enough (`profile_min`). `x`: the
    patients' values of the normaliser's checked columns (raw[:, norm.checked], float64). `leave_out` (like x):
    values the slope does not use (the service's: those beyond LEAVE_OUT_SD; one such
    value would otherwise set a least-squares slope alone and read as another unit)."""
    out = []
    for m, a, b, block, seen, n in _profile_blocks(norm, x, leave_out, lambda spread: spread >= profile_min):
        mu = norm.checked_mean[a:b]
        c = np.where(seen, mu - (np.where(seen, mu, 0).sum(axis=1, keepdims=True) / np.maximum(n, 1)[:, None]), 0.0)
        v = np.where(seen, block, 0.0)
        v = np.where(seen, v - v.sum(axis=1, keepdims=True) / np.maximum(n, 1)[:, None], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (c * v).sum(axis=1) / (c * c).sum(axis=1)
        # the panel's share is of the values measured, before any are left out (a table in another scale loses values
        # beyond LEAVE_OUT_SD to its own error: that must not spare it the test)
        measured = (~np.isnan(block)).sum(axis=1)
        enough = measured >= max(UNITS_MIN_VALUES, math.ceil(SLOPE_MIN_SHARE * (b - a)))
        out.append((m, np.where(enough & (n >= UNITS_MIN_VALUES), slope, np.nan)))
    return out


def profile_shifts(norm, signed: np.ndarray, leave_out: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(modality, each patient's mean signed z; NaN with fewer than UNITS_MIN_VALUES values) for the modalities whose
    mean profile is flat (spread below PROFILE_MIN), where real patients' means stay near 0. `signed`: the patients'
    z-scores of the normaliser's checked columns; `leave_out` (like it): values not used (those beyond
    LEAVE_OUT_SD)."""
    out = []
    for m, _, _, block, seen, n in _profile_blocks(norm, signed, leave_out, lambda spread: not spread >= PROFILE_MIN):
        mean = np.where(seen, block, 0.0).sum(axis=1) / np.maximum(n, 1)
        out.append((m, np.where(n >= UNITS_MIN_VALUES, mean, np.nan)))
    return out


def imputed_spreads(norm, signed: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(modality, each patient's SD of its z-scores over the modality's features; NaN with fewer than
    UNITS_MIN_VALUES values) for every modality wide enough: a filled-in modality barely varies (IMPUTED_SD)."""
    out = []
    for m, a, b in norm.checked_groups:
        if b - a < UNITS_MIN_VALUES:
            continue
        block = signed[:, a:b]
        n = (~np.isnan(block)).sum(axis=1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a patient without the modality: NaN, no warning
            sd = np.nanstd(block, axis=1)
        out.append((m, np.where(n >= UNITS_MIN_VALUES, sd, np.nan)))
    return out


# --- the contract --------------------------------------------------------------------------------------
def check_frames(schema: FeatureSchema, frames: dict, limits: ServeSettings) -> tuple[list[str], np.ndarray, list[dict], list[dict]]:
    """Frames -> ids, raw, errors, warnings (validation's messages)."""
    checked = check_prediction_tables(schema, frames)
    modality_of_file = {file: m for m, (_, file) in frames.items()}
    errors, warnings = [], []
    for p in checked.problems:
        (errors if p.severity == "error" else warnings).append(problem_dict(p, modality_of_file.get(p.file)))
    if len(checked.ids) > limits.max_patients:
        raise InputTooLarge("patients", f"{len(checked.ids)} patients in one request; at most {limits.max_patients} "
                                        "(serve.max-patients in site.json)")
    return checked.ids, checked.raw, errors, warnings


def _as_sent(lm, raw: np.ndarray, i: int, col: int) -> tuple[str, str, float]:
    """(modality, feature, patient i's value as the site sent it: a log1p input undone) of the model's input `col`."""
    m, f = lm.feature_at[col]
    value = float(raw[i, col])
    return m, f, float(np.expm1(value)) if lm.inputs[m][f][1] == "log" else value


def check_patients(lm, ids: list[str], raw: np.ndarray, limits: ServeSettings) -> tuple[list[dict], list[dict]]:
    """Coverage and distance from the training distribution, per patient: (notes, errors)."""
    schema = lm.schema
    n_inputs = raw.shape[1]
    observed = ~np.isnan(raw)
    present = features_present(lm, observed)  # (patients, modalities)
    counts = present.sum(axis=1)
    total = counts / n_inputs
    per_modality = present / lm.modality_sizes
    # standard deviations from the site's training mean, numeric columns with statistics only (scaled, and unscaled ones observed)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = lm.normalizer
        x = raw[:, norm.checked].astype(np.float64)
        signed = norm.checked_z(x)
        z = np.abs(signed)
        far = z > limits.out_of_range_sd  # a missing value (NaN) is never far
        outlying = z > LEAVE_OUT_SD
    n_far = far.sum(axis=1)
    # another unit or scale (raw counts for log values, x1000): most of a modality's values far from the site's
    # patients, which no patient of the site's own (or of the held-out hospitals) comes near (docs/results.md)
    units = []  # (modality, values seen, values beyond units-sd) per patient, for the modalities wide enough
    with np.errstate(invalid="ignore"):
        for m, a, b in norm.checked_groups:
            if b - a >= UNITS_MIN_VALUES:
                block = z[:, a:b]
                units.append((m, (block == block).sum(axis=1), (block > limits.units_sd).sum(axis=1)))
    narrow = [(m, a, b) for m, a, b in norm.checked_groups if b - a < UNITS_MIN_VALUES]
    slopes = profile_slopes(norm, x, leave_out=outlying)
    shifts = profile_shifts(norm, signed, leave_out=outlying)
    spreads = imputed_spreads(norm, signed)
    names = [m.name for m in schema.modalities]
    notes, errors = [], []
    for i, pid in enumerate(ids):
        coverage = {m: round(v, 4) for m, v in zip(names, per_modality[i].tolist())}
        note = {"coverage": coverage, "coverage_total": round(float(total[i]), 4), "warnings": [], "out_of_range": []}
        def summary() -> str:
            return ", ".join(f"{m} {int(round(v * schema.modality(m).n_features))}/{schema.modality(m).n_features}"
                             for m, v in coverage.items())

        if not counts[i]:
            errors.append({"loc": f"patient {pid}", "code": "no_usable_feature", "patients": [pid],
                           "msg": "no usable feature: every modality is missing or empty, so any prediction would "
                                  "be a guess", "fix": "send at least one modality with values"})
        elif total[i] < limits.min_coverage:
            errors.append({"loc": f"patient {pid}", "code": "low_coverage", "patients": [pid], "coverage": coverage,
                           "msg": f"{counts[i]} of the schema's {n_inputs} features present "
                                  f"({total[i]:.1%}), below the site's minimum {limits.min_coverage:.0%} "
                                  f"(per modality: {summary()})",
                           "fix": "send more of the patient's data, or lower serve.min-coverage in site.json"})
        elif total[i] < limits.warn_coverage:
            note["warnings"].append({"code": "low_coverage", "msg": f"only {total[i]:.0%} of the model's inputs "
                                     f"present ({summary()}): the prediction rests on less data than usual"})
        for m, seen, beyond in units:
            n_seen, n_beyond = int(seen[i]), int(beyond[i])
            if n_seen >= UNITS_MIN_VALUES and 2 * n_beyond > n_seen:
                errors.append({"loc": f"patient {pid}", "code": "units", "patients": [pid], "modality": m,
                               "msg": f"{n_beyond} of the {n_seen} {m!r} values are more than {limits.units_sd:g} SD "
                                      "from the site's training mean: the table seems to be in another unit or "
                                      "scale (e.g. raw counts instead of log values, or x1000), and any prediction "
                                      "would be a guess",
                               "fix": f"export the {m} values in the unit the schema describes (docs/site-data.md); "
                                      "if they are right, raise serve.units-sd in site.json"})
        for m, a, b in narrow:
            for j in np.flatnonzero(z[i, a:b] > NARROW_UNITS_SD) + a:
                _, f, value = _as_sent(lm, raw, i, int(norm.checked[j]))
                errors.append({"loc": f"patient {pid}", "code": "units", "patients": [pid], "modality": m,
                               "feature": f,
                               "msg": f"{m}.{f} = {value:.6g} is {float(z[i, j]):.0f} SD from the site's training "
                                      f"mean (its own patients stay within 5): the value seems to be in another unit "
                                      "(e.g. an age in days or months for years), and any prediction would be a guess",
                               "fix": f"export {f} in the unit the schema describes (docs/site-data.md)"})
        for m, slope in slopes:
            k = float(slope[i])
            if not np.isfinite(k) or SLOPE_WARN[0] <= k <= SLOPE_WARN[1]:
                continue
            scale = (f"its {m!r} values follow the site's mean profile at {k:.2f} times its scale (the site's own "
                     f"patients: {SLOPE_WARN[0]:g}-{SLOPE_WARN[1]:g}): the values seem to be in another unit or log "
                     "base (log10 or ln for log2 multiply them by 0.30 or 0.69)")
            if not SLOPE_REFUSE[0] <= k <= SLOPE_REFUSE[1]:
                errors.append({"loc": f"patient {pid}", "code": "units", "patients": [pid], "modality": m,
                               "msg": scale + ", and any prediction would be a guess",
                               "fix": f"export the {m} values in the unit and log base the schema describes "
                                      "(docs/site-data.md)"})
            else:
                note["warnings"].append({"code": "units_scale", "msg": scale + "; check the export before relying "
                                         "on this prediction"})
        for m, spread in spreads:
            s = float(spread[i])
            if np.isfinite(s) and s < IMPUTED_SD:
                note["warnings"].append({
                    "code": "imputed_modality", "msg": f"its {m!r} values sit on the site's mean profile (their SD over "
                    f"the features is {s:.2f} site SDs; every patient of the site's: at least {IMPUTED_SD:g}): the "
                    "modality seems filled in (a mean or median imputed), not measured, and the answer rests on it as "
                    "if it were; send the modality as missing (null) instead"})
        for m, shift in shifts:
            k = float(shift[i])
            if np.isfinite(k) and abs(k) > SHIFT_WARN:
                note["warnings"].append({
                    "code": "units_shift", "msg": f"its {m!r} values sit {k:+.2f} SD from the site's training means on "
                    f"average (the site's own patients and other hospitals': within +-{SHIFT_WARN:g}): the table seems "
                    "to be normalised differently (e.g. another reference or centring); check the export before "
                    "relying on this prediction"})
        if n_far[i]:
            js = np.flatnonzero(far[i])
            js = js[np.argsort(-z[i, js])][:5]
            for j in js:
                m, f, value = _as_sent(lm, raw, i, int(norm.checked[j]))
                note["out_of_range"].append({"modality": m, "feature": f, "value": value,
                                             "sd_from_mean": round(float(z[i, j]), 1)})
            listing = ", ".join(f"{o['modality']}.{o['feature']} = {o['value']:.4g} ({o['sd_from_mean']:g} SD)"
                                for o in note["out_of_range"])
            msg = (f"{int(n_far[i])} value(s) more than {limits.out_of_range_sd:g} SD from the site's training "
                   f"mean: {listing}")
            if limits.refuse_out_of_range:
                errors.append({"loc": f"patient {pid}", "code": "out_of_range", "patients": [pid], "msg": msg,
                               "fix": "check the units and the export; the site refuses such values "
                                      "(serve.refuse-out-of-range in site.json)"})
            else:
                note["warnings"].append({"code": "out_of_range", "msg": msg + "; the model never saw such values"})
        notes.append(note)
    return notes, errors


def checked_json(lm, patients: list, limits: ServeSettings) -> CheckedPatients:
    if len(patients) > limits.max_patients:
        raise InputTooLarge("body.patients", f"{len(patients)} patients in one request; at most "
                                             f"{limits.max_patients} (serve.max-patients in site.json)")
    raw, ids, frames, problems = json_frames(lm.schema, patients, lm.inputs, limits)
    warnings: list[dict] = []
    if raw is None:
        ids_t, raw_t, errors, warnings = check_frames(lm.schema, frames, limits)
        if any(p["code"] == "duplicate_ids" for p in problems):  # said once for the request, not per modality
            errors = [e for e in errors if e["code"] != "duplicate_ids"]
        problems += errors
        if not problems:  # patients without any modality have no row in any frame
            index = {pid: k for k, pid in enumerate(ids_t)}
            raw = np.full((len(ids), lm.schema.layout().n_inputs), np.nan, dtype=np.float32)
            for k, pid in enumerate(ids):
                if pid in index:
                    raw[k] = raw_t[index[pid]]
    return _finish(lm, ids, raw, problems, warnings, limits)


def checked_tables(lm, table_dir: Path, limits: ServeSettings) -> CheckedPatients:
    frames, problems = table_frames(lm.schema, table_dir)
    if (apart := tables_apart(frames)) is not None:
        problems.append(apart)
    elif (differently := ids_written_differently(frames)) is not None:
        problems.append(differently)
    warnings = [p for p in problems if p.get("severity") == "warning"]
    problems = [p for p in problems if p.get("severity") != "warning"]
    ids, raw, errors, more = check_frames(lm.schema, frames, limits)
    return _finish(lm, ids, raw, problems + errors, warnings + more, limits)


def _finish(lm, ids, raw, problems, warnings, limits) -> CheckedPatients:
    if not problems:  # a table's ids (a JSON request's were checked as they were read)
        problems = [{"loc": "ids", "code": "bad_id", "patients": [pid], **bad} for pid in ids if (bad := id_problem(pid))]
    if not problems and (alike := ambiguous_ids(ids)):
        problems = [alike]
    if not problems:
        notes, problems = check_patients(lm, ids, raw, limits)
    if problems:
        raise PredictionInputError(capped(problems, limits.max_problems))
    return CheckedPatients(ids, raw, notes, capped(warnings, limits.max_problems))
