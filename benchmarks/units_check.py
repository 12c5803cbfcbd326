"""How far from a site's training patients real patients sit, per modality: the evidence for `serve.units-sd`.

The prediction service refuses a patient's modality when most of its values (at least 10 standardised
features) are more than `serve.units-sd` SDs from the site's training mean (client/prediction_input.py,
code "units"): a table in another unit or scale. This prints, for the sites of an `oncofed simulate`
output, the percentiles of each patient's median |z| per modality over the site's own patients and over
the held-out hospitals' patients, and the same for the held-out patients with the modality's values
x1000 (a unit error), so that the threshold sits between what real patients reach and what a unit
error gives.

    python benchmarks/units_check.py RUN_DIR [--sites C0,C5]     # RUN_DIR: oncofed simulate --out RUN_DIR
    python benchmarks/units_check.py RUN_DIR --slopes             # another log base: slopes against the mean profile
    python benchmarks/units_check.py RUN_DIR --shifts             # another normalisation: a constant shift
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def median_z(lm, raw: np.ndarray) -> dict[str, np.ndarray]:
    """Per modality with at least 10 standardised features: each patient's median |z| (patients with values)."""
    norm = lm.normalizer
    z = np.abs(norm.checked_z(raw[:, norm.checked].astype(np.float64)))
    out = {}
    for m, a, b in norm.checked_groups:
        if b - a < 10:
            continue
        block = z[:, a:b]
        has = ~np.isnan(block).all(axis=1)
        out[m] = np.nanmedian(block[has], axis=1)
    return out


def site_tables(run: Path, site: str):
    """(the site's serving model as it loads it, its own patients' checked tables, the held-out hospitals')."""
    from client.predict import Predictor
    from privacy.site_config import ServeSettings, SiteConfig

    limits = ServeSettings(max_patients=10**9)
    cfg = SiteConfig.load(run / "state" / site / "site.json")
    predictor = Predictor(cfg.model_dir, Path(cfg.state_dir) / "normalizer.json", cfg.signing_public_key or None)
    return (predictor.current, predictor.checked_tables(run / "sites" / site, limits),
            predictor.checked_tables(run / "sites" / "holdout", limits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `oncofed simulate --out` directory")
    ap.add_argument("--sites", default="C0,C5")
    ap.add_argument("--slopes", action="store_true", help="instead: each patient's slope against the site's mean "
                    "profile (profile_slopes), as exported and in another log base")
    ap.add_argument("--shifts", action="store_true", help="instead: each patient's mean signed z per modality, as "
                    "exported and with every value shifted by a constant (another normalisation)")
    ap.add_argument("--narrow", action="store_true", help="instead: each patient's largest |z| in the modalities too "
                    "narrow for the median test (fewer than 10 standardised features), the per-value unit check's")
    ap.add_argument("--panels", action="store_true", help="instead: the slope test on the sites' own patients with "
                    "only a panel of each modality's features (the k most variable, or k at random), as a targeted "
                    "assay measures: how often a correct patient is flagged or refused")
    ap.add_argument("--range", action="store_true", help="instead: the share of patients with a value beyond each of "
                    "several SDs from the site's training mean (what serve.out-of-range-sd flags), own and held-out")
    ap.add_argument("--imputed", action="store_true", help="instead: each patient's SD of its z-scores over a "
                    "modality's features (imputed_spreads), the site's own patients against the modality filled with the "
                    "site's mean or median profile")
    args = ap.parse_args()
    for mode, measure in (("imputed", imputed), ("range", out_of_range), ("panels", panels), ("narrow", narrow),
                          ("slopes", slopes), ("shifts", shifts)):
        if getattr(args, mode):
            return measure(args)
    rows = []
    print(f"{'site':5} {'patients':22} {'modality':9} {'n':>5}  median |z| per patient: p50 / p99 / p99.9 / max")
    for site in args.sites.split(","):
        lm, own, held = site_tables(args.run, site)
        own, held = own.raw, held.raw
        layout = lm.schema.layout()
        cases = [("own", own, None), ("held-out", held, None)]
        for m in median_z(lm, held):
            scaled = held.copy()
            scaled[:, layout.slices[m]] *= 1000  # the model's inputs (log values where the schema says so) x1000
            cases.append((f"held-out, {m} x1000", scaled, m))
        for name, raw, only in cases:
            for m, med in median_z(lm, raw).items():
                if only is not None and m != only:
                    continue
                p50, p99, p999 = np.percentile(med, [50, 99, 99.9])
                rows.append({"site": site, "patients": name, "modality": m, "n": int(len(med)), "p50": round(p50, 2),
                             "p99": round(p99, 2), "p99.9": round(p999, 2), "max": round(float(med.max()), 2)})
                print(f"{site:5} {name:22} {m:9} {len(med):5}  {p50:8.2f} / {p99:8.2f} / {p999:8.2f} / {med.max():8.2f}")
    print(json.dumps({"benchmark": "units_check", "rows": rows}))


def narrow(args) -> None:
    """Each patient's largest |z| per modality with fewer than UNITS_MIN_VALUES standardised features (a clinical
    age): the values NARROW_UNITS_SD judges one by one."""
    from client.prediction_input import NARROW_UNITS_SD, UNITS_MIN_VALUES

    print(f"{'site':5} {'patients':9} {'modality':9} {'n':>5}  largest |z| per patient: p99 / p99.9 / max "
          f"(refused as units beyond {NARROW_UNITS_SD:g})")
    for site in args.sites.split(","):
        lm, own, held = site_tables(args.run, site)
        norm = lm.normalizer
        for name, tables in (("own", own), ("held-out", held)):
            z = np.abs(norm.checked_z(tables.raw[:, norm.checked].astype(np.float64)))
            for m, a, b in norm.checked_groups:
                if b - a >= UNITS_MIN_VALUES:
                    continue
                top = np.nanmax(np.where(np.isnan(z[:, a:b]), -np.inf, z[:, a:b]), axis=1)
                top = top[np.isfinite(top)]
                p99, p999 = np.percentile(top, [99, 99.9])
                print(f"{site:5} {name:9} {m:9} {len(top):5}  {p99:6.2f} / {p999:6.2f} / {top.max():6.2f}")


def imputed(args) -> None:
    """Each patient's SD of z over a modality's features, for the site's own patients (min / p0.1 / p1 / p50), and
    for the modality filled with the median of the site's own patients (a mean fill gives 0): IMPUTED_SD's margin."""
    from client.prediction_input import IMPUTED_SD, imputed_spreads

    print(f"{'site':5} {'modality':9} {'n':>5}  own patients' SD of z: min / p0.1 / p1 / p50 | a median fill "
          f"(flagged below {IMPUTED_SD:g})")
    for site in args.sites.split(","):
        lm, own, _ = site_tables(args.run, site)
        norm = lm.normalizer
        x = own.raw[:, norm.checked].astype(np.float64)
        filled = np.nanmedian(x, axis=0, keepdims=True)
        ours = dict(imputed_spreads(norm, norm.checked_z(x)))
        fill = dict(imputed_spreads(norm, norm.checked_z(filled)))
        for m, s in ours.items():
            s = s[np.isfinite(s)]
            q = np.percentile(s, [0.1, 1, 50])
            print(f"{site:5} {m:9} {len(s):5}  {s.min():.3f} / " + " / ".join(f"{v:.3f}" for v in q)
                  + f" | {float(fill[m][0]):.3f}")


def out_of_range(args) -> None:
    """The share of a site's own and of the held-out hospitals' patients with at least one value beyond k SDs from the
    site's training mean, for several k: how often `serve.out-of-range-sd` = k flags a correct answer."""
    from privacy.site_config import ServeSettings

    ks = (6, 8, 10, 12, 15, 20)
    default = ServeSettings().out_of_range_sd
    print(f"{'site':5} {'patients':9} {'n':>5}  share with a value beyond k SD: " + "  ".join(
        f"{k}{'*' if k == default else ''}" for k in ks) + "   (*: the default)")
    for site in args.sites.split(","):
        lm, own, held = site_tables(args.run, site)
        norm = lm.normalizer
        for name, tables in (("own", own), ("held-out", held)):
            z = np.abs(norm.checked_z(tables.raw[:, norm.checked].astype(np.float64)))
            top = np.nanmax(np.where(np.isnan(z), -1.0, z), axis=1)
            print(f"{site:5} {name:9} {len(top):5}  " + "  ".join(f"{np.mean(top > k):.3f}" for k in ks))


def panels(args) -> None:
    """The slope test (client.prediction_input.profile_slopes, with SLOPE_MIN_SHARE) on the sites' own patients, each
    modality with a varied profile reduced to a panel of k features: the most variable ones (a targeted assay), or k
    at random. Measured on the sites' own patients only: the share of correct answers refused (`units`) or flagged."""
    from client.prediction_input import LEAVE_OUT_SD, PROFILE_MIN, SLOPE_REFUSE, SLOPE_WARN, profile_slopes, profile_spread

    rng = np.random.default_rng(0)
    print(f"{'site':5} {'modality':9} {'panel':18} {'judged':>6} {'refused':>8} {'flagged':>8}")
    for site in args.sites.split(","):
        lm, own, _ = site_tables(args.run, site)
        norm = lm.normalizer
        x0 = own.raw[:, norm.checked].astype(np.float64)
        for m, a, b in norm.checked_groups:
            if b - a < 10 or profile_spread(norm, a, b) < PROFILE_MIN:
                continue
            order = np.argsort(-np.nanvar(x0[:, a:b], axis=0))
            for k in sorted({10, 20, 50, 100, (b - a) // 2 + 1, b - a}):
                for how in ("most variable", "random"):
                    cols = order[:k] if how == "most variable" else rng.choice(b - a, k, replace=False)
                    x = x0.copy()
                    block = x[:, a:b]
                    block[:, np.setdiff1d(np.arange(b - a), cols)] = np.nan
                    x[:, a:b] = block
                    with np.errstate(invalid="ignore"):
                        far = np.abs(norm.checked_z(x)) > LEAVE_OUT_SD
                    s = dict(profile_slopes(norm, x, leave_out=far))[m]
                    judged = np.isfinite(s)
                    s = s[judged]
                    refused = float(np.mean((s < SLOPE_REFUSE[0]) | (s > SLOPE_REFUSE[1]))) if len(s) else 0.0
                    flagged = float(np.mean((s < SLOPE_WARN[0]) | (s > SLOPE_WARN[1]))) if len(s) else 0.0
                    print(f"{site:5} {m:9} {f'{k} {how}':18} {int(judged.sum()):6} {refused:8.3f} {flagged:8.3f}")


def slopes(args) -> None:
    """Each patient's slope against the site's mean profile (client.prediction_input.profile_slopes) per modality,
    with the profile's spread (its SD over features in within-feature SDs), as exported and in another log base."""
    from client.prediction_input import LEAVE_OUT_SD, profile_slopes, profile_spread
    print(f"{'site':5} {'patients':28} {'modality (spread)':17} {'n':>5}  slope per patient: p0.1 / p1 / p50 / p99 / "
          "p99.9")
    for site in args.sites.split(","):
        lm, own, held = site_tables(args.run, site)
        norm, own, held = lm.normalizer, own.raw, held.raw
        spread = {m: profile_spread(norm, a, b) for m, a, b in norm.checked_groups}
        for name, raw, factor in (("own", own, 1.0), ("held-out", held, 1.0),
                                  ("held-out, ln for log2", held, np.log(2)),
                                  ("held-out, log10 for log2", held, np.log10(2))):
            x = raw[:, norm.checked].astype(np.float64) * factor
            with np.errstate(invalid="ignore"):  # as the service: values beyond out-of-range-sd are left out
                far = np.abs(norm.checked_z(x)) > LEAVE_OUT_SD
            for m, s in profile_slopes(norm, x, profile_min=0.0, leave_out=far):  # every modality, to show why
                m = f"{m} ({spread[m]:.2f})"  # the profile's spread: the service judges slopes from PROFILE_MIN
                s = s[np.isfinite(s)]
                q = np.percentile(s, [0.1, 1, 50, 99, 99.9])
                print(f"{site:5} {name:28} {m:17} {len(s):5}  " + " / ".join(f"{v:6.2f}" for v in q))


def shifts(args) -> None:
    """Each patient's mean signed z per modality (at least 10 values), for the site's own patients, the held-out
    hospitals' and the held-out ones with every value of every modality shifted by a constant in the model's input
    units (log2 for miRNA: +1 is a 2x factor on every value): whether a per-patient statistic could tell a table on
    another normalisation from real patients."""
    from client.prediction_input import check_patients
    from privacy.site_config import ServeSettings

    limits = ServeSettings(max_patients=10**9)
    print(f"{'site':5} {'patients':16} {'modality':9} {'n':>5}  mean signed z per patient: p0.1 / p1 / p50 / p99 / "
          "p99.9 | flagged units_shift by the service, shifting this modality alone")
    for site in args.sites.split(","):
        lm, own, held = site_tables(args.run, site)
        norm, layout = lm.normalizer, lm.schema.layout()
        for name, tables, shift in (("own", own, 0.0), ("held-out", held, 0.0), ("held-out +0.5", held, 0.5),
                                    ("held-out +1", held, 1.0), ("held-out -1", held, -1.0)):
            z = norm.checked_z(tables.raw[:, norm.checked].astype(np.float64) + shift)
            for m, a, b in norm.checked_groups:
                if b - a < 10:
                    continue
                block = z[:, a:b]
                seen = ~np.isnan(block)
                keep = seen.sum(axis=1) >= 10
                mean = np.where(seen, block, 0.0)[keep].sum(axis=1) / seen[keep].sum(axis=1)
                q = np.percentile(mean, [0.1, 1, 50, 99, 99.9])
                raw = tables.raw.copy()
                raw[:, layout.slices[m]] += shift
                notes, _ = check_patients(lm, list(tables.ids), raw, limits)
                flagged = sum(any(w["code"] == "units_shift" for w in n["warnings"]) for n in notes)
                print(f"{site:5} {name:16} {m:9} {len(mean):5}  " + " / ".join(f"{v:6.2f}" for v in q)
                      + f" | {flagged} of {len(mean)}")


if __name__ == "__main__":
    main()
