"""A hospital site's settings: its site.json, and the `serve` object in it.

Written by `oncofed site init` (privacy/pki.py) and `oncofed simulate`; read by `oncofed site start`,
`site privacy-audit`, `serve`, `predict` and `audit verify`. Every key's type, bound, default and
meaning is defined here once. `SiteConfig.load` refuses an unknown key or a bad value with a message
naming the file, the key and the fix; a command asks for the keys it needs with `require`. `write`
writes the keys that were set (a file without a key keeps its default when read), so what a writer
writes is what a reader reads. It lives beside the provisioning that writes it, below client/.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from privacy import MAX_BUDGET
from shared_models.files import read_json_file, write_json_atomic
from shared_models.limits import MIN_COUNT
from shared_models.run_config import MAX_DELTA, no_bool_for_numbers

FILE_FORMAT = "oncofed-site/1"

# a server address: a host (a name, an IPv4 address or a bracketed IPv6 one) and a TCP port 1-65535
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
                       r"|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])")


def replace_key_command(key: str | Path) -> str:
    """The shell commands that replace a site's node key (docs/hospital-guide.md, "Keys"): the old pair moved away
    first (ssh-keygen stops at "Overwrite (y/n)?" over an existing key), a new ECDSA P-384 key in OpenSSH format (what
    Flower accepts), and its fingerprint printed: read to the operator, and set as site.json's public-key-sha256."""
    from shlex import quote

    old, pub, key = quote(f"{Path(key).parent / 'old'}/"), quote(f"{key}.pub"), quote(str(key))
    return f"`mkdir -p {old} && mv {key} {pub} {old}; ssh-keygen -t ecdsa -b 384 -N '' -f {key} && sha256sum {pub}`"


def host_port(host: str, port: int) -> str:
    """HOST:PORT as HOST_PORT reads it (parse_address's inverse): an IPv6 literal in brackets, `[::1]:9443`, as
    `::1:9443` names no port."""
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


# What the SuperNode hands the deployed ClientApp (--node-config): where the site's data and state live,
# and its policy, the keys on which the site is authoritative over any run config.
NODE_POLICY_KEYS = ("site-name", "privacy-budget", "privacy-delta", "require-secagg", "min-aggregate-sites", "require-dp",
                    "max-trusted-sites", "require-padded-batches", "min-count")
NODE_CONFIG_KEYS = ("data-path", "state-dir", "model-dir", "signing-public-key", "schema") + NODE_POLICY_KEYS
# the node config's path of site.json itself: the training app re-reads its policy at every message (`stricter`)
SITE_CONFIG_KEY = "site-config"


# the settings that name files or directories: relative ones are read from site.json's directory (SiteConfig.load)
PATH_FIELDS = ("data_path", "state_dir", "model_dir", "signing_public_key", "root_certificates",
               "auth_supernode_private_key", "schema_path")


class SiteConfigError(ValueError):
    """site.json is missing or wrong: names the file, the key and the fix."""


INLINE_BYTES = 64 * 1024  # a JSON prediction request this small is checked by the input-check process (or inline)


class ServeSettings(BaseModel):
    """The `serve` object of site.json (every key optional): limits and what the service refuses."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    _no_bool_for_numbers = field_validator("*", mode="before")(no_bool_for_numbers)

    min_coverage: float = Field(0.02, ge=0, le=1, alias="min-coverage",
                                description="refuse a patient with a smaller share of the schema's features")
    warn_coverage: float = Field(0.5, ge=0, le=1, alias="warn-coverage", description="flag coverage below this")
    # 10: the sites' own patients reach it in 1.3-3.9% of answers, 6 SD in 20-22% (`python benchmarks/units_check.py
    # RUN --range`, docs/results.md): a flag on a fifth of correct answers is one nobody reads
    out_of_range_sd: float = Field(10.0, gt=0, alias="out-of-range-sd",
                                   description="flag values this many SDs from the site's training mean")
    refuse_out_of_range: bool = Field(False, alias="refuse-out-of-range")
    units_sd: float = Field(4.0, gt=0, alias="units-sd", description="refuse a patient's modality when most of "
                            "its values (of at least 10 standardised features) are this many SDs from the site's "
                            "training mean: another unit or scale (the training and held-out patients' medians stay "
                            "below 2.6 SD)")
    low_confidence: float = Field(0.5, ge=0, le=1, alias="low-confidence",
                                  description="flag a prediction whose probability is below this")
    min_pattern_accuracy: float = Field(
        0.5, ge=0, le=1, alias="min-pattern-accuracy",
        description="flag a prediction whose modality pattern was measured below this accuracy (by `serve "
                    "calibrate`, or before it by the model package's measurement)")
    refuse_weak_pattern: bool = Field(
        False, alias="refuse-weak-pattern",
        description="refuse (422) a request with a patient whose modality pattern was measured below "
                    "min-pattern-accuracy (by `serve calibrate`, or before it by the model package's measurement), "
                    "instead of answering with the flag")
    max_patients: int = Field(1000, ge=1, alias="max-patients")
    max_body_mb: float = Field(50, gt=0, alias="max-body-mb")
    max_decompressed_mb: float = Field(64, gt=0, alias="max-decompressed-mb")
    max_json_depth: int = Field(32, ge=6, alias="max-json-depth")
    max_problems: int = Field(50, ge=1, alias="max-problems")
    queue_patients: int = Field(4096, ge=1, alias="queue-patients",
                                description="patients waiting for the model; more: 503 with Retry-After")
    explain_queue_patients: int = Field(2000, ge=1, alias="explain-queue-patients")
    batch_window_ms: float = Field(2.0, ge=0, le=100, alias="batch-window-ms",
                                   description="wait up to this long for as many requests as the last batch held "
                                               "before scoring a batch (a lone client never waits); 0: never wait")
    api_docs: bool = Field(False, alias="api-docs", description="serve /openapi.json and /docs (a plain list of the "
                           "routes, no assets from the internet)")
    explanations: Literal["process", "thread"] = Field(
        "process", description="where explanation requests (top_k > 0) are parsed, checked, scored and explained: "
        "'process' = a child process at the lowest CPU priority (off the service's GIL), 'thread' = the service's "
        "explanation thread")
    input_check: Literal["process", "inline"] = Field(
        "process", alias="input-check", description=f"where a JSON prediction request of up to {INLINE_BYTES // 1024} KB is parsed "
        "and checked: 'process' = a child process (off the service's GIL: more predictions per second at lower "
        "latency), 'inline' = on the service's event loop")


class SiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    _no_bool_for_numbers = field_validator("*", mode="before")(no_bool_for_numbers)

    file_format: Literal["oncofed-site/1"] = Field(FILE_FORMAT, alias="format", description="the file's format")
    site_name: str = Field("", alias="site-name", description="the site's name in the consortium (its ledger, "
                           "audit anchors and the server's records)")
    consortium: str = Field("", description="the consortium's name, from its public/ bundle")
    superlink: str = Field("", description="the consortium server's address "
                           "HOST:PORT, e.g. fl.consortium.example:443 (`site start --superlink` overrides it)")
    data_path: str = Field("", alias="data-path", description="the site directory of tables the site trains on "
                           "(see `oncofed validate`)")
    state_dir: str = Field(..., alias="state-dir", min_length=1, description="the site's state: privacy ledger, "
                           "audit log, tokens, normaliser")
    model_dir: str = Field(..., alias="model-dir", min_length=1, description="the store of installed global models")
    privacy_budget: float | None = Field(None, alias="privacy-budget", gt=0, le=MAX_BUDGET, description="the "
                                         "site's privacy budget: the total epsilon allowed on its data over all "
                                         f"runs, at most {MAX_BUDGET:g} (what the site's accounting verifies)")
    privacy_delta: float | None = Field(None, alias="privacy-delta", gt=0, le=MAX_DELTA, description="the delta at "
                                        "which the budget is accounted (empty: the runs' delta), at most "
                                        f"{MAX_DELTA:g} like a run's (a larger one would refuse every run); the ledger "
                                        "keeps the smallest delta it was ever opened with, so no run re-prices past "
                                        "spend down")
    min_count: int = Field(MIN_COUNT, alias="min-count", ge=1, description="counts below this are never reported")
    require_secagg: bool = Field(True, alias="require-secagg", strict=True, description="refuse training requests without "
                                 "SecAgg+ (the server would see this site's update)")
    min_aggregate_sites: int = Field(2, alias="min-aggregate-sites", ge=2, description="the fewest sites whose "
                                     "SecAgg+ sum the site helps unmask (a sum of one is one site's update)")
    require_dp: bool = Field(True, alias="require-dp", strict=True, description="refuse training requests without DP-SGD")
    max_trusted_sites: int = Field(1, alias="max-trusted-sites", ge=1, description="the most sites, this one "
                                   "included, relied on to add their noise share in a dp-mode 'distributed' run")
    require_padded_batches: bool = Field(True, alias="require-padded-batches", strict=True, description="refuse DP-SGD runs "
                                         "whose steps' cost would grow with the patients sampled (run config "
                                         "dp-pad-batches = false): the round's seconds would reveal it")
    signing_public_key: str = Field("", alias="signing-public-key", description="the consortium's model-signing "
                                    "key (signing.pub, from its public/ bundle; `oncofed site init` copies it to "
                                    "trust/signing.pub): required, except in a simulation")
    simulated: bool = Field(False, strict=True, description="a simulated hospital (`oncofed simulate` writes it): "
                            "its models may be served without a model-signing key; never set at a real site")
    root_certificates: str = Field("", alias="root-certificates", description="the consortium's CA certificate "
                                   "(trust/ca.crt)")
    auth_supernode_private_key: str = Field("", alias="auth-supernode-private-key", description="the site's "
                                            "node-authentication key (keys/site.key)")
    schema_path: str = Field("", alias="schema", description="the consortium's feature schema (trust/schema.json)")
    schema_sha256: str = Field("", alias="schema-sha256", description="the SHA-256 of the schema file, "
                               "from the bundle's signed manifest (not the schema's content hash)")
    public_key_sha256: str = Field("", alias="public-key-sha256", description="the SHA-256 of keys/site.key.pub, "
                                   "as the operator registers it")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="the prediction service's limits")

    _source: str = PrivateAttr("site.json")


    @field_validator("superlink")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v and not HOST_PORT.fullmatch(v):
            raise ValueError("write HOST:PORT with a port 1-65535, e.g. fl.consortium.example:443")
        return v

    @field_validator("site_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if any(c in v for c in '"\\\n'):
            raise ValueError("a site name holds no quote, backslash or line break (Flower's node config could not "
                             "carry it, and the SuperNode would not start)")
        return v
    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        """site.json's settings, its relative paths taken from site.json's directory: every process of the site
        (the SuperNode, the training app, the service, each command, whatever directory it runs in) then reads one
        state directory, one ledger."""
        path = Path(path)
        settings = read_json_file(path, SiteConfigError, "`oncofed site init` writes it")
        config = cls.parse(settings, source=str(path))
        base = path.resolve().parent
        for name in PATH_FIELDS:
            value = getattr(config, name)
            if value and not Path(value).is_absolute():
                setattr(config, name, str(base / value))
        return config

    @classmethod
    def parse(cls, settings: dict, source: str = "site.json") -> SiteConfig:
        """The settings, or SiteConfigError naming `source`, each bad key, what was found and the fix."""
        try:
            config = cls.model_validate(settings)
        except ValidationError as e:
            raise _error(source, [_problem(cls, err) for err in e.errors()]) from None
        config._source = source
        return config

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json", by_alias=True, exclude_unset=True))

    def unverifiable(self) -> str:
        """Why no delivered model can be verified at this site ("" if one can, or the site is simulated): without the
        consortium's model-signing key, a model altered on its way or in model-dir would be served as the one the
        consortium trained."""
        if self.signing_public_key or self.simulated:
            return ""
        return (f"{self._source}: signing-public-key is not set, so no model can be checked against the consortium's "
                "signature; set it to the consortium's signing.pub (in the public/ bundle from the operator; `oncofed "
                "site init` copies it to trust/signing.pub and writes this key)")

    def require(self, *keys: str, fix: str) -> SiteConfig:
        """This config if every key (site.json's spelling) is set and not empty; else SiteConfigError naming them."""
        fields = {f.alias or name: (name, f) for name, f in type(self).model_fields.items()}
        missing = [k for k in keys if getattr(self, fields[k][0]) in (None, "")]
        if missing:
            raise _error(self._source, [f"{k}: not set; {fix}: {fields[k][1].description}" for k in missing])
        return self


def _error(source: str, problems: list[str]) -> SiteConfigError:
    if len(problems) == 1:
        return SiteConfigError(f"{source}: {problems[0]}")
    return SiteConfigError(f"{source}: invalid ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems))


def _problem(model: type[BaseModel], err: dict) -> str:
    """One validation error as `key: what is wrong (got value); the fix, and what the key means`."""
    loc = [str(k) for k in err["loc"]]
    if not loc:
        return f"{err['msg']}; write a JSON object of settings, as `oncofed site init` does"
    fields = model.model_fields
    for part in loc[:-1]:  # down to the object holding the key (the `serve` object)
        inner = next(f.annotation for name, f in fields.items() if part in (name, f.alias))
        fields = inner.model_fields
    field = next((f for name, f in fields.items() if loc[-1] in (name, f.alias)), None)
    if field is None:
        hint = f"unknown key: check its spelling or remove it (keys: {', '.join(f.alias or n for n, f in fields.items())})"
    elif err["type"] == "missing":
        hint = f"add it (`oncofed site init` writes it): {field.description}"
    else:
        hint = "fix the value" + ("" if field.is_required() else " or remove the key") + (
            f": {field.description}" if field.description else "")
    got = f" (got {err['input']!r})" if field is not None and err["type"] != "missing" else ""
    return f"{'.'.join(loc)}: {err['msg'].removeprefix('Value error, ')}{got}; {hint}"


def stricter(started: SiteConfig, now: SiteConfig) -> SiteConfig:
    """The policy a running site holds to: `started` (what its SuperNode started with) with each policy key the
    stricter of that and `now` (site.json as it reads now). An edit that tightens the policy (a lower budget, a
    smaller delta, SecAgg+, DP or padded batches required, a higher floor, fewer trusted sites) holds from the next
    training message; one that loosens it waits for a restart and its preflight. No budget on either side is no
    budget: the site trains no DP run."""
    budgets, deltas = (started.privacy_budget, now.privacy_budget), (started.privacy_delta, now.privacy_delta)
    return started.model_copy(update={
        "privacy_budget": None if None in budgets else min(budgets),
        "privacy_delta": min((d for d in deltas if d is not None), default=None),
        "require_secagg": started.require_secagg or now.require_secagg,
        "require_dp": started.require_dp or now.require_dp,
        "require_padded_batches": started.require_padded_batches or now.require_padded_batches,
        "min_aggregate_sites": max(started.min_aggregate_sites, now.min_aggregate_sites),
        "min_count": max(started.min_count, now.min_count),
        "max_trusted_sites": min(started.max_trusted_sites, now.max_trusted_sites)})
