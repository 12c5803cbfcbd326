"""The run configuration of a federated training run, parsed by the server and by every site.

Flower hands both sides `context.run_config`, a flat dict with the kebab-case keys of
`[tool.flwr.app.config]` in pyproject.toml (overridable with `flwr run . --run-config 'k=v'`).
`RunConfig.from_flower` validates it once at start: a bad value stops the run immediately with a
message naming the key and the fix. The largest epsilon a site's accounting verifies is the privacy
layer's fact (privacy.MAX_BUDGET), which this contract layer does not import, so `RunConfig.from_flower`
and `parse_overrides` require it as `max_epsilon`. Product code (server, sites, command lines,
simulations, benchmarks) calls neither directly: it reads run configs through
`privacy.run_config.load_run_config` and `parse_run_overrides`, which pass the bound. `max_epsilon=None`
(no upper bound) is for tests of this contract alone.

Paths are absolute or relative to the directory the run was started from (`base-dir`), because
the ServerApp and the ClientApps do not run in the project directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from shared_models.model import ModelConfig



class RunConfigError(ValueError):
    """A run configuration that cannot be used; names the key and the fix."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # --- where things are -------------------------------------------------------------------
    base_dir: str = Field("", alias="base-dir", description="directory relative paths are resolved from")
    schema_path: str = Field(..., alias="schema", description="consortium feature schema JSON")
    data_root: str = Field("", alias="data-root",
                           description="simulation: directory of site dirs written by `oncofed partition`")
    output_dir: str = Field("runs/latest", alias="output-dir",
                            description="server: checkpoints, metrics.jsonl, final model")
    site_state_root: str = Field("", alias="site-state-root",
                                 description="simulation: per-site state (ledger, model store); default DATA-ROOT/state")
    eval_data: str = Field("", alias="eval-data", description="server: optional validation site dir")
    run_name: str = Field("oncofed", alias="run-name", description="names the run in ledgers and packages")
    resume: bool = Field(False, description="continue from the latest checkpoint in output-dir")
    deliver_only: bool = Field(False, alias="deliver-only", description="server: no training, only sign and send "
                               "output-dir's saved final model to the sites that have not installed it "
                               "(`oncofed deliver`)")
    signing_key: str = Field("", alias="signing-key",
                             description="server: Ed25519 key that signs the delivered model (empty: unsigned)")
    signing_public_key: str = Field("", alias="signing-public-key", description="simulation: the sites' trust "
                                    "anchor for model packages (a site's node config wins); set: unsigned refused")

    # --- federation -------------------------------------------------------------------------
    num_rounds: int = Field(10, alias="num-rounds", ge=1)
    sites: int = Field(0, ge=0, description="sites expected before round 1 (0: min-sites)")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedavgm"] = Field(
        "fedavg", description="'fedavgm': FedAvg with server momentum (server-lr, momentum); dp-mode 'distributed' "
        "steps a server optimizer: 'fedavgm' or 'fedadam'")
    proximal_mu: float = Field(0.01, alias="proximal-mu", ge=0)
    server_lr: float = Field(0.03, alias="server-lr", gt=0, description="FedAdam server learning rate (0.03: best of "
                             "0.003-0.1 on the main job with DP, README)")
    evaluate_every: int = Field(1, alias="evaluate-every", ge=1,
                                description="sites score the global model every N rounds and after the last")
    min_sites: int = Field(2, alias="min-sites", ge=1, description="sites needed to start and finish a round")
    round_timeout: float = Field(600.0, alias="round-timeout", gt=0, description="seconds; SecAgg+ needs one")
    secagg: bool = Field(True, description="Flower SecAgg+ (the server sees only the sum of updates)")
    secagg_clipping_range: float = Field(
        1.0, alias="secagg-clipping-range", gt=0, description="bound on |delta * n / max-weight| per weight")
    secagg_max_weight: float = Field(
        2000.0, alias="secagg-max-weight", gt=0, description=">= the largest site's training patients")
    secagg_threshold: float = Field(
        0.66, alias="secagg-threshold", gt=0, le=1, description="share of sites needed to unmask a round")

    # --- privacy (the site's node config overrides the budget in deployment) -----------------
    dp: bool = True
    epsilon: float = Field(8.0, gt=0, description="per-site budget (simulation; a site's node config wins); at most "
                           "privacy.MAX_BUDGET: what the site's accounting verifies")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, alias="max-grad-norm", gt=0, description="per-sample clipping bound C")
    dp_mode: Literal["site", "distributed"] = Field(
        "site", alias="dp-mode", description="'site': each site's update is DP on its own (trusts nobody); "
        "'distributed': one DP-SGD step of the whole consortium per round, DP for the SecAgg+ sum as long as "
        "trusted-sites sites add their noise share (docs/privacy.md)")
    trusted_sites: int = Field(2, alias="trusted-sites", ge=1, description="dp-mode 'distributed': the fewest sites "
                               "(each site itself included) assumed to add their noise share honestly; each adds "
                               "1/trusted-sites of the noise. A site refuses a run assuming more than its node config "
                               "max-trusted-sites")
    sample_rate: float = Field(0.1, alias="sample-rate", gt=0, le=1, description="dp-mode 'distributed': the share of "
                               "its training patients each site Poisson-samples for a round's step (above ~0.1 with "
                               "hundreds of rounds the subsampling bound gets loose: docs/privacy.md)")
    dp_clipping: Literal["ghost", "opacus"] = Field(
        "ghost", alias="dp-clipping", description="how DP-SGD clips per sample: 'ghost' = privacy/clipping.py "
        "(norms without per-sample gradients; Opacus' sampling, noise and accountant), 'opacus' = Opacus' hooks mode")

    # --- local training ---------------------------------------------------------------------
    # DP-SGD defaults, tuned on the 8-hospital pan-cancer federation (README, "Federated training")
    local_epochs: int = Field(2, alias="local-epochs", ge=1)
    batch_size: int = Field(256, alias="batch-size", ge=1, description="expected batch (Poisson sampling under DP)")
    lr: float = Field(1.0, gt=0, description="peak local learning rate; 1.0 is the DP recipe's (SGD with momentum, "
                      "per-sample clipping bounds each step). Without DP use 0.2 with batch-size 64 (SGD) or 0.002 "
                      "(AdamW), as `oncofed simulate --no-dp` does")
    local_optimizer: Literal["adamw", "sgd"] = Field(
        "sgd", alias="local-optimizer", description="'sgd' with momentum (the default, with and without DP: chosen on "
        "the sites' validation parts, docs/results.md 'Site mode, chosen on the sites' validation parts') or "
        "'adamw' (lr 0.02 with DP, 0.002 without)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of local-optimizer 'sgd'")
    weight_decay: float = Field(1e-4, alias="weight-decay", ge=0)
    warmup_fraction: float = Field(0.1, alias="warmup-fraction", ge=0, lt=1)
    val_fraction: float = Field(0.2, alias="val-fraction", ge=0, lt=1, description="site's local held-out part")
    min_count: int = Field(5, alias="min-count", ge=1, description="counts below this are never reported")
    local_softmax: Literal["all", "site"] = Field(
        "all", alias="local-softmax", description="'site': each site's loss is a softmax over the cancer types it "
        "has training patients of (FedRS, alpha 0), for label-skewed federations; without DP only (README, "
        "'Federated training')")
    seed: int = 0

    # --- model (architecture; must match on every side) ---------------------------------------
    d_model: int = Field(64, alias="d-model")
    n_latents: int = Field(16, alias="n-latents")
    chunk_size: int = Field(64, alias="chunk-size")
    linear_rank: int = Field(16, alias="linear-rank", ge=0)
    latent_blocks: int = Field(0, alias="latent-blocks", ge=0)
    tabular_blocks: int = Field(0, alias="tabular-blocks", ge=0)
    fusion_blocks: int = Field(2, alias="fusion-blocks", ge=1)
    wide_rank: Annotated[int, Field(ge=0)] | Literal["full"] = Field(
        "full", alias="wide-rank", description="'full' for DP-SGD: a factorised wide path multiplies the noise of "
        "its two factors (README, 'Federated training'); ModelConfig's 16 serves centralized training")
    wide_gain: float = Field(4.0, alias="wide-gain", gt=0,
                             description="4 for DP-SGD (the wide paths' share of each clipped gradient); "
                                         "ModelConfig's 1 is better for non-private centralized training")
    dropout: float = 0.1

    @field_validator("epsilon")
    @classmethod
    def _within_the_accounting(cls, v: float, info: ValidationInfo) -> float:
        limit = (info.context or {}).get("max_epsilon")
        if limit is not None and v > limit:  # worded as pydantic's own le= bound
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": f"{limit:g}"})
        return v

    @field_validator("wide_rank", mode="before")
    @classmethod
    def _wide_rank(cls, v):
        if v == "full" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError('use "full" (one Linear(F, classes) per modality, the default) or a rank >= 0 '
                         "(0: no wide paths)")

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ValueError("strategy 'fedprox' with proximal-mu 0 is FedAvg; set proximal-mu > 0 or use fedavg")
        if self.dp_mode == "distributed":
            from math import frexp

            problems = []
            if not self.dp:
                problems.append("needs dp = true")
            if not self.secagg:
                problems.append("needs secagg = true: without SecAgg+ the server sees each site's share, whose noise "
                                "alone is 1/trusted-sites of what the guarantee assumes")
            if self.strategy not in ("fedavgm", "fedadam"):
                problems.append(f"steps a server optimizer: set strategy to 'fedavgm' (momentum) or 'fedadam', not "
                                f"{self.strategy!r}")
            if frexp(self.secagg_clipping_range)[0] != 0.5:
                problems.append(f"needs secagg-clipping-range a power of two (got {self.secagg_clipping_range:g}): "
                                "the sites' grid values must pass SecAgg+'s scaling exactly")
            if self.secagg_max_weight != int(self.secagg_max_weight):
                problems.append(f"needs a whole secagg-max-weight (got {self.secagg_max_weight:g})")
            if self.sites and self.trusted_sites > self.sites:
                problems.append(f"trusted-sites {self.trusted_sites} exceeds the run's {self.sites} sites")
            if problems:
                raise ValueError("dp-mode 'distributed' " + "; ".join(problems))
        if self.dp and self.local_softmax == "site":
            raise ValueError("local-softmax 'site' takes each site's set of cancer types from its labels, which "
                             "DP-SGD's analysis does not cover; use local-softmax 'all' with dp, or dp false")
        return self

    def model_config_(self) -> "ModelConfig":
        from shared_models.model import ModelConfig  # torch: only where a model is built

        return ModelConfig(d_model=self.d_model, n_latents=self.n_latents, chunk_size=self.chunk_size,
                           linear_rank=self.linear_rank, latent_blocks=self.latent_blocks,
                           tabular_blocks=self.tabular_blocks, fusion_blocks=self.fusion_blocks, wide_rank=self.wide_rank, wide_gain=self.wide_gain,
                           dropout=self.dropout)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or not self.base_dir else Path(self.base_dir) / p

    @classmethod
    def from_flower(cls, run_config: dict, source: str = "run config", *, max_epsilon: float | None) -> "RunConfig":
        """The run config, or RunConfigError listing every bad key and its fix.

        `max_epsilon` (required): refuse an epsilon above it. Product code does not call this: it calls
        `privacy.run_config.load_run_config`, which passes privacy.MAX_BUDGET. `max_epsilon=None` says
        explicitly that there is no upper bound (tests of this contract alone)."""
        try:
            return cls.model_validate(dict(run_config), context={"max_epsilon": max_epsilon})
        except ValidationError as e:
            lines = [f"{source}: invalid ({e.error_count()} problem{'s' if e.error_count() > 1 else ''}):"]
            for err in e.errors():
                key = ".".join(str(k) for k in err["loc"]) or "(run config)"
                hint = {"extra_forbidden": "unknown key: check its spelling against [tool.flwr.app.config]",
                        "missing": "add it to [tool.flwr.app.config] or pass --run-config"}.get(err["type"], "")
                field = cls.model_fields.get(str(err["loc"][0]) if err["loc"] else "")
                field = field or next((f for f in cls.model_fields.values() if f.alias == key), None)
                if not hint and field is not None and field.description:
                    hint = field.description  # what the setting means and its limits
                    if max_epsilon is not None:
                        hint = hint.replace("privacy.MAX_BUDGET", f"{max_epsilon:g} (privacy.MAX_BUDGET)")
                got = f" (got {err['input']!r})" if err["loc"] and err["type"] != "missing" and "input" in err else ""
                lines.append(f"  - {key}: {err['msg'].removeprefix('Value error, ')}{got}" + (f"; {hint}" if hint else ""))
            raise RunConfigError("\n".join(lines)) from None


def app_defaults(project: Path) -> dict:
    """The run config the project's Flower app declares (`[tool.flwr.app.config]` of its pyproject.toml),
    which `flwr run` merges overrides into."""
    import tomllib

    path = Path(project) / "pyproject.toml"
    try:
        return dict(tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise RunConfigError(f"{path}: no [tool.flwr.app.config] ({e}); run OncoFed from its project directory "
                             "(a checkout installed with pip install -e .)") from None


def parse_overrides(items: list[str], source: str = "--set", *, max_epsilon: float | None) -> dict:
    """KEY=VALUE pairs typed as TOML would type them (a bare word is a string), each checked against RunConfig
    (`max_epsilon` required, as in RunConfig.from_flower: product code calls
    `privacy.run_config.parse_run_overrides`, which passes privacy.MAX_BUDGET; None: no upper bound).

    Checks across keys (e.g. dp with local-softmax) wait for the whole run config: the overrides alone
    do not know what the command line or pyproject set besides them."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RunConfigError(f"{source} {item}: write KEY=VALUE, e.g. {source} num-rounds=10")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    try:
        RunConfig.model_validate({"schema": "check.json", **out}, context={"max_epsilon": max_epsilon})
    except ValidationError as e:
        if any(err["loc"] for err in e.errors()):  # a value wrong whatever else is set: say which, and why
            RunConfig.from_flower({"schema": "check.json", **out}, source=source, max_epsilon=max_epsilon)
    return out


def flwr_overrides(values: dict) -> str:
    """The `flwr run --run-config` string for a dict of run-config values."""
    import json

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())
