"""The run configuration of a federated training run, parsed by the server and by every site.

One typed, nested configuration: `RunConfig` has a section per concern (`run`: files and identity;
`federation`: rounds, sites, strategy; `secagg`; `privacy`; `training`: a site's local recipe; `site`: what a
site holds back and reports; `model`: the architecture, `ModelConfig`, which the model is built from as it
is). Every default is defined once, here; `pyproject.toml`'s `[tool.flwr.app.config]` lists the same values
(a test compares them: `python -m shared_models.run_config` prints the block).

Flower hands both sides `context.run_config`, a flat dict with the kebab-case keys of
`[tool.flwr.app.config]` (overridable with `flwr run . --run-config 'k=v'`). Each setting keeps its flat
key (`lr`, `epsilon`, `d-model`: the alias of its field), so a user writes the same key in pyproject, in
`--run-config` and in `oncofed simulate --set`; `RunConfig.from_flower` files the keys into their sections
and validates them once at start: a bad value stops the run immediately with a message naming the key and
the fix.

The DP and the no-DP recipe differ in learning rate, batch and clipping bound (`RECIPES`): `lr`, `batch-size`
and `max-grad-norm` = "auto" (the defaults) take the recipe of the run's `dp` and `local-optimizer` (the
clipping bound of dp-mode "distributed" is its own), so a deployment and a simulation get the same recipe
without setting any; a number overrides it (under DP with SGD in dp-mode "site", lr and max-grad-norm only together:
a step scales with their product, `_half_given_step`).

The largest epsilon a site's accounting verifies is the privacy layer's fact (privacy.MAX_BUDGET), which
this contract layer does not import, so `RunConfig.from_flower` and `parse_overrides` require it as
`max_epsilon`. Product code calls neither directly: it reads run configs through
`privacy.run_config.load_run_config` and `parse_run_overrides`, which pass the bound. `max_epsilon=None`
(no upper bound) is for tests of this contract alone.

Paths are absolute or relative to the directory the run was started from (`base-dir`), because
the ServerApp and the ClientApps do not run in the project directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared_models.limits import MIN_COUNT
from shared_models.spelling import closest_key

if TYPE_CHECKING:
    from shared_models.training import TrainConfig


class RunConfigError(ValueError):
    """A run configuration that cannot be used; names the key and the fix."""


def no_bool_for_numbers(cls, value, info: ValidationInfo):
    """A before-validator: true/false where a number belongs is refused (pydantic reads true as 1, so `epsilon =
    true` or `--set num-rounds=true` would run with 1). Fields that may be a boolean keep them."""
    if isinstance(value, bool):
        annotation = cls.model_fields[info.field_name].annotation
        members = get_args(annotation) if get_origin(annotation) is not Annotated else (annotation,)
        allowed = {get_args(m)[0] if get_origin(m) is Annotated else m for m in (members or (annotation,))}
        if bool not in allowed and allowed & {int, float}:
            raise ValueError("a number is expected here, not true or false")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)
    _no_bool_for_numbers = field_validator("*", mode="before")(no_bool_for_numbers)


FUSION_BLOCKS = 2  # a model's fusion depth outside a run, without DP and in dp-mode "distributed"


class ModelConfig(_Section):
    """Architecture hyper-parameters (must match on every side); the defaults are sized for CPU training under
    DP-SGD. `CENTRALIZED_MODEL` is the variant measured better for non-private centralized training."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    d_model: int = Field(64, ge=8)
    n_heads: int = Field(4, ge=1)
    n_latents: int = Field(16, ge=1, description="Perceiver latent array size per omics modality")
    chunk_size: int = Field(64, ge=1, description="omics features per input token")
    latent_blocks: int = Field(0, ge=0, description="latent self-attention blocks per omics encoder")
    linear_rank: int = Field(
        16, ge=0, description="rank of each omics encoder's linear path over all its features (0 = none)")
    tabular_blocks: int = Field(
        0, ge=0, description="transformer blocks over column tokens (0 = a learned linear embedding, mean-pooled)")
    fusion_blocks: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="transformer blocks over the modality tokens; 'auto': the recipe's for the run's dp (1 in "
        "dp-mode 'site', 2 without DP and in 'distributed'; a model built outside a run: 2)")
    wide_rank: Annotated[int, Field(ge=0)] | Literal["full"] = Field(
        "full", description="rank of each modality's wide path, a linear map from its numeric inputs straight to "
        "the logits (0 = none; 'full' = one unfactorised Linear(F, classes), the DP-SGD choice: a factorised wide "
        "path multiplies the noise of its two factors, docs/model.md)")
    wide_gain: float = Field(4.0, gt=0, description="the wide paths' input multiplier (their first layer's initial "
                             "weights are divided by it): scales their share of each clipped per-sample gradient; "
                             "4 for DP-SGD")
    ff_mult: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="on residual branches")
    attention_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="on attention probabilities; > 0 forces SDPA's slow math path on CPU")
    modality_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = Field(
        "auto", alias="modality-dropout", description="in training, each present modality of each patient is masked "
        "as missing with this probability (the patient keeps at least one): the model learns to answer from each "
        "modality rather than lean on one (serving masks nothing); 'auto': the recipe's for the run's dp (0.25 "
        "without DP, 0 with; a model built outside a run: 0)")

    @property
    def modality_dropout_rate(self) -> float:
        return 0.0 if self.modality_dropout == "auto" else float(self.modality_dropout)

    @property
    def fusion_block_count(self) -> int:
        return FUSION_BLOCKS if self.fusion_blocks == "auto" else int(self.fusion_blocks)

    @field_validator("fusion_blocks", "modality_dropout", mode="before")
    @classmethod
    def _number_or_auto(cls, v, info: ValidationInfo):  # one message for a bad value, not one per accepted type
        if isinstance(v, bool):
            return v  # no_bool_for_numbers says what true or false is doing here
        number = isinstance(v, (int, float))
        if v == "auto" or (number and (0 <= v < 1 if info.field_name == "modality_dropout" else v >= 1 and v == int(v))):
            return v
        raise ValueError(f"use {'a probability in [0, 1)' if info.field_name == 'modality_dropout' else 'a whole number >= 1'}"
                         " or \"auto\" (the recipe's)")

    @field_validator("wide_rank", mode="before")
    @classmethod
    def _wide_rank(cls, v):
        if v == "full" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError('use "full" (one Linear(F, classes) per modality, the default) or a rank >= 0 '
                         "(0: no wide paths)")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d-model ({self.d_model}) must be divisible by n-heads ({self.n_heads})")
        return self


CENTRALIZED_MODEL = ModelConfig(wide_rank=16, wide_gain=1.0)
"""Non-private centralized training (`oncofed baseline`): a rank-16 wide path at gain 1 measured better there."""


class RunSection(_Section):
    """Where things are and which run this is."""

    base_dir: str = Field("", alias="base-dir", description="directory relative paths are resolved from")
    schema_path: str = Field(..., alias="schema", description="consortium feature schema JSON")
    data_root: str = Field("", alias="data-root",
                           description="simulation: directory of site dirs written by `oncofed partition`")
    output_dir: str = Field("runs/latest", alias="output-dir",
                            description="server: checkpoints, metrics.jsonl, final model")
    site_state_root: str = Field("", alias="site-state-root",
                                 description="simulation: per-site state (ledger, model store); default DATA-ROOT/state")
    eval_data: str = Field("", alias="eval-data", description="server: optional validation site dir")
    name: str = Field("oncofed", alias="run-name", description="names the run in ledgers and packages")
    resume: bool = Field(False, description="continue from the latest checkpoint in output-dir")
    keep_checkpoints: int = Field(3, alias="keep-checkpoints", ge=0, description="server: round checkpoints kept "
                                  "in output-dir (the newest; resuming needs only the latest); 0 keeps all")
    deliver_only: bool = Field(False, alias="deliver-only", description="server: no training, only sign and send "
                               "output-dir's saved final model to the sites that have not installed it "
                               "(`oncofed deliver`)")
    signing_key: str = Field("", alias="signing-key",
                             description="server: Ed25519 key that signs the delivered model (empty: unsigned)")
    signing_public_key: str = Field("", alias="signing-public-key", description="simulation: the sites' trust "
                                    "anchor for model packages (a site's node config wins); set: unsigned refused")
    site_registry: str = Field("", alias="site-registry", description="server: the consortium's register of sites "
                               "(consortium.json; `oncofed run` sets it): each node's records are filed under the name "
                               "its authentication key was registered with; empty: the name each site reports")


Strategy = Literal["fedavg", "fedprox", "fedadam", "fedavgm"]  # the server strategies (server/strategy.py BASES)


@dataclass(frozen=True)
class Recipe:
    """A named local-training recipe: the batch (under DP, the public patient count whose sample-rate share is
    the divisor batch-size "auto" takes), and peak learning rate and clipping bound per local optimizer."""

    batch_size: int | None  # without DP; None: under DP, round(sample-rate x patients)
    patients: int | None    # under DP: the public stand-in for a site's training patients
    lr: dict[str, float]
    max_grad_norm: dict[str, float]
    modality_dropout: float
    fusion_blocks: int


RECIPES = {
    # chosen on the pan-cancer federation's sites' validation parts (docs/results.md): with DP, per-sample
    # clipping bounds every step, so SGD with momentum takes a large lr over Poisson batches. A bound of 0.01
    # clips every patient's gradient to that norm, so each step is the sum of unit directions over batch-size
    # times lr x C = 1 (automatic clipping, Bu et al. 2023, in effect); on the validation parts (mean of seeds
    # 0-2) C 0.01 / lr 100: 0.613, C 0.1 / lr 5: 0.610, C 0.1 / lr 10: 0.601, C 1 / lr 1: 0.577. batch-size is
    # the public divisor of that sum, sample-rate x a public stand-in for a site's training patients (640: the
    # main job's ~630, rounded; 192 at 0.3): 192: 0.620, 256: 0.586 and 128: 0.569 (seed 0), sample-rate 0.5
    # with 320: 0.626 (mean of seeds 0-2)
    # modality-dropout, on the validation parts (seeds 0-2): with DP 0.25 lowers macro-F1 (0.599 against 0.630)
    # and 0.1 at seed 0 (0.599 against 0.610); without DP 0.25 ties overall (0.833 against 0.829) and the patterns
    # without miRNA, the others masked, gain 0.300 -> 0.489 accuracy (docs/results.md, "Without DP: variants")
    # fusion-blocks, dp-mode "site", on the validation parts (seeds 0-5, 2026-12-07): 1 block 0.638 against 2 blocks'
    # 0.613, above at every seed (+0.010 to +0.064); dp-mode "distributed" keeps the 2 its recipe was chosen with
    "dp": Recipe(batch_size=None, patients=640, lr={"sgd": 100.0, "adamw": 0.02}, max_grad_norm={"sgd": 0.01, "adamw": 1.0},
                 modality_dropout=0.0, fusion_blocks=1),
    "no-dp": Recipe(batch_size=64, patients=None, lr={"sgd": 0.2, "adamw": 0.002}, max_grad_norm={"sgd": 1.0, "adamw": 1.0},
                    modality_dropout=0.25, fusion_blocks=FUSION_BLOCKS),
}
"""The recipes `lr`, `batch-size`, `max-grad-norm`, `modality-dropout` and `fusion-blocks` = "auto" take, by the run's
`dp` (true: "dp")."""

DP_SGD_STEP = RECIPES["dp"].lr["sgd"] * RECIPES["dp"].max_grad_norm["sgd"]
"""lr x max-grad-norm of the DP recipe's SGD in dp-mode "site": every patient's gradient is clipped, so a step scales with
the product, and lr and max-grad-norm go together (RunConfig refuses one given alone)."""


class FederationSection(_Section):
    num_rounds: int = Field(10, alias="num-rounds", ge=1)
    sites: int = Field(0, ge=0, description="sites expected before round 1 (0: min-sites)")
    strategy: Strategy = Field(
        "fedavg", description="'fedavgm': FedAvg with server momentum (server-lr, momentum); dp-mode 'distributed' "
        "steps a server optimizer: 'fedavgm' or 'fedadam'")
    proximal_mu: float = Field(0.01, alias="proximal-mu", ge=0, description="'fedprox': after each local step the "
                               "weights move a / (1 + a) of the way back to the global weights, a = lr x mu (the "
                               f"proximal operator); the DP recipe's lr {RECIPES['dp'].lr['sgd']:g} makes the default 0.01 "
                               f"a = {RECIPES['dp'].lr['sgd'] * 0.01:g}: scale mu with lr (mu x lr is what pulls)")
    server_lr: float = Field(0.03, alias="server-lr", gt=0, description="server learning rate of 'fedadam' and "
                             "'fedavgm' ('fedavg' and 'fedprox' add the sites' mean delta and do not use it). 0.03 is "
                             "FedAdam's (its best of 0.003-0.1 on the main job with the AdamW DP recipe of 2026-12-02, in "
                             "the git history of docs/results.md); FedAvgM's global step is server-lr x its "
                             "momentum-accumulated mean delta, so 0.03 makes it a small part of FedAvg's step (~1/10; "
                             "0.03 at the first round, at most 0.3 with momentum 0.9): set ~1 for 'fedavgm'. dp-mode "
                             "'distributed': its FedAdam recipe is 0.003 (docs/privacy.md)")
    min_sites: int = Field(2, alias="min-sites", ge=1, description="sites needed to start and finish a round")
    evaluate_every: int = Field(1, alias="evaluate-every", ge=1,
                                description="sites score the global model every N rounds and after the last")
    round_timeout: float = Field(600.0, alias="round-timeout", gt=0, description="seconds; SecAgg+ needs one")


class SecAggSection(_Section):
    enabled: bool = Field(True, alias="secagg", description="Flower SecAgg+ (the server sees only the sum of updates)")
    clipping_range: float = Field(
        1.0, alias="secagg-clipping-range", gt=0, description="bound on |delta * weight / max-weight| (the weight: a "
        "site's patients without DP, batch-size / sample-rate in dp-mode 'site')")
    max_weight: float = Field(
        2000.0, alias="secagg-max-weight", gt=0, description=">= the largest site's training patients (without DP "
        "a larger site is refused; in dp-mode 'distributed' the public bound the grid's range is checked for)")
    threshold: float = Field(
        0.66, alias="secagg-threshold", gt=0.5, le=1, description="share of sites needed to unmask a round; one Flower "
        "rounds to more than half of the share holders for every federation (at least 0.63): at half or fewer, a "
        "server sending different sites different unmask lists can unmask one site's update, and the sites refuse")


# The largest delta a run or a site may ask for: a public constant (a bound that followed a site's count would publish
# it), a tenth of 1 / patients for sites of up to 1,000; the default 1e-5 is that up to 10,000, and a larger site
# sets its own privacy-delta below 1 / (10 x its patients) in site.json (docs/privacy.md)
MAX_DELTA = 1e-4
# SecAgg+ shares keys among at most this many neighbours of each site (Flower's sparse graph beyond it; odd, as
# Flower's neighbour graph wants): no sum is unmasked for a site whose floor (min-sites, trusted-sites) is above it
SECAGG_MAX_SHARES = 21


def flower_threshold(share: float, shares: int) -> int:
    """The sites whose key shares Flower 1.41's SecAgg+ needs to unmask, for reconstruction_threshold `share` and
    `shares` share holders (SecAggPlusWorkflow.setup_stage: Python's round, half to even, and at least 2)."""
    return max(round(share * shares), 2)


def threshold_refusal(share: float) -> str:
    """Why secagg-threshold `share` cannot train ("" if it can): Flower rounds it to half of some count of 2 to
    SECAGG_MAX_SHARES share holders or fewer, where every site refuses the round (client/app.py: a server sending
    different sites different unmask lists could take one site's update out)."""
    counts = range(2, SECAGG_MAX_SHARES + 1)
    if not (bad := [n for n in counts if 2 * flower_threshold(share, n) <= n]):
        return ""
    lowest = next(t / 100 for t in range(51, 101) if all(2 * flower_threshold(t / 100, n) > n for n in counts))
    return (f"secagg-threshold {share:g}: Flower's SecAgg+ rounds {share:g} x {bad[0]} share holders to "
            f"{flower_threshold(share, bad[0])}, half of them: every site would refuse such rounds (a server sending "
            f"different sites different unmask lists could take one site's update out); use at least {lowest:g}")


class PrivacySection(_Section):
    """Record-level DP at each site (the site's node config overrides the budget in deployment)."""

    enabled: bool = Field(True, alias="dp", description="DP-SGD at every site (docs/privacy.md)")
    epsilon: float = Field(8.0, gt=0, description="what one run may add to a site's spend (in a simulation also each "
                           "site's budget; a deployed site's privacy-budget in site.json caps its total); at most "
                           "privacy.MAX_BUDGET: what the site's accounting verifies")
    delta: float = Field(1e-5, gt=0, le=MAX_DELTA, description="the chance each site's guarantee fails outright; "
                         f"at most {MAX_DELTA:g} (a delta near 1 / patients allows releasing a patient's record "
                         "whole)")
    max_grad_norm: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", alias="max-grad-norm", description="per-sample clipping bound C (without DP: the bound of each step's "
        "global gradient norm); 'auto': the recipe's for the run's dp and local optimizer in dp-mode 'site' (0.01 for "
        "SGD: RECIPES), 0.1 in dp-mode 'distributed' (DISTRIBUTED_MAX_GRAD_NORM), 1.0 without DP. Under DP with SGD in "
        f"dp-mode 'site' it goes with lr (a step scales with lr x max-grad-norm, {DP_SGD_STEP:g} in the recipe): give "
        "both or neither, one alone is refused")
    clipping: Literal["ghost", "opacus"] = Field(
        "ghost", alias="dp-clipping", description="how DP-SGD clips per sample: 'ghost' = privacy/clipping.py "
        "(norms without per-sample gradients; Opacus' sampling, noise and accountant), 'opacus' = Opacus' hooks mode")
    pad_batches: bool = Field(
        True, alias="dp-pad-batches", description="dp-mode 'site': every DP-SGD step computes a fixed number of rows "
        "(the Poisson sample, padded with patients it did not sample, weighted 0), so a round's seconds do not "
        "reveal how many patients were sampled; ~1.4x the rows at the default batch (privacy/sampling.py). "
        "dp-mode 'distributed' always pads")
    pad_to: int = Field(
        0, alias="dp-pad-to", ge=0, description="under DP with padded batches, every site's steps compute the rows "
        "of a site of this many training patients (a public bound, at least the largest site's), so a round's "
        "seconds do not depend on a site's patient count; a site with more pads to its own. 0: each site pads to "
        "its own count, and the seconds reveal its size roughly (docs/privacy.md)")
    mode: Literal["site", "distributed"] = Field(
        "site", alias="dp-mode", description="'site': each site's update is DP on its own (trusts nobody); "
        "'distributed': one DP-SGD step of the whole consortium per round, DP for the SecAgg+ sum as long as "
        "trusted-sites sites add their noise share (docs/privacy.md)")
    trusted_sites: int = Field(2, alias="trusted-sites", ge=1, description="dp-mode 'distributed': the fewest sites "
                               "(each site itself included) assumed to add their noise share honestly; each adds "
                               "1/trusted-sites of the noise. A site refuses a run assuming more than its node config "
                               "max-trusted-sites")
    sample_rate: float = Field(0.3, alias="sample-rate", gt=0, le=1, description="under DP the share of its "
                               "training patients each site Poisson-samples for a step, the same at every site (a rate "
                               "from the site's own count would publish it). dp-mode 'site': round(1 / sample-rate) "
                               "steps per local epoch; 'distributed': one step per round (0.3: better than 0.1 on the "
                               "sites' validation parts at 250 rounds, and a tighter worst case; docs/results.md)")

    @field_validator("epsilon")
    @classmethod
    def _within_the_accounting(cls, v: float, info: ValidationInfo) -> float:
        limit = (info.context or {}).get("max_epsilon")
        if limit is not None and v > limit:  # worded as pydantic's own le= bound
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": f"{limit:g}"})
        return v

    @property
    def distributed(self) -> bool:
        """dp-mode "distributed" in a DP run: one Skellam step of the whole consortium per round under SecAgg+."""
        return self.enabled and self.mode == "distributed"



DISTRIBUTED_MAX_GRAD_NORM = 0.1
"""dp-mode 'distributed': the clipping bound, chosen on the sites' validation parts (0.1 above 1 on every seed,
0.01 below both: docs/results.md, "Distributed DP"); the server learning rate and sample rate were chosen at 1,
and FedAdam's tau follows C (server/strategy.py)."""
DISTRIBUTED_FUSION_BLOCKS = FUSION_BLOCKS  # the model the distributed recipe (docs/results.md, "Distributed DP") was chosen on


DISTRIBUTED_PATIENTS = 5000
"""dp-mode 'distributed': a public stand-in for the consortium's training patients (which no site sends under DP):
the main job's 5,021, rounded. batch-size "auto", what the server divides the noisy sum by, is round(sample-rate x
5000), the expected total batch: 1500 at 0.3. A consortium of another size sets batch-size to its own such figure."""


def auto_batch_size(dp: bool, distributed: bool, sample_rate: float) -> int:
    """What batch-size "auto" is: the no-DP recipe's batch, or under DP sample-rate x the recipe's public patient
    count (a site's in dp-mode 'site', the consortium's in 'distributed'), so that the divisor follows the rate."""
    if not dp:
        return RECIPES["no-dp"].batch_size
    patients = DISTRIBUTED_PATIENTS if distributed else RECIPES["dp"].patients
    return max(1, round(sample_rate * patients))


class TrainingSection(_Section):
    """A site's local training in a round."""

    local_epochs: int = Field(2, alias="local-epochs", ge=1, description="passes over the site's training patients "
                              "per round; not used in dp-mode 'distributed' (one step per round)")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", alias="batch-size", description="without DP the batch; under DP a public number the noisy sum of "
        "clipped gradients is divided by, in place of the expected batch (sample-rate x the patients), which would "
        "publish the patient count: a site's in dp-mode 'site', the consortium's in 'distributed'. 'auto': "
        f"{RECIPES['no-dp'].batch_size} without DP; with DP round(sample-rate x {RECIPES['dp'].patients}), a public "
        f"stand-in for a site's training patients (RECIPES), in dp-mode 'distributed' round(sample-rate x "
        f"{DISTRIBUTED_PATIENTS}) for the consortium's (DISTRIBUTED_PATIENTS)")
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="peak local learning rate; 'auto': the recipe's for the run's dp and local-optimizer "
        f"(with DP {RECIPES['dp'].lr['sgd']:g} for SGD at max-grad-norm {RECIPES['dp'].max_grad_norm['sgd']:g}, "
        f"{RECIPES['dp'].lr['adamw']:g} for AdamW; without {RECIPES['no-dp'].lr['sgd']:g} and "
        f"{RECIPES['no-dp'].lr['adamw']:g}: RECIPES). Under DP with SGD in dp-mode 'site' it goes with max-grad-norm "
        f"(a step scales with lr x max-grad-norm, {DP_SGD_STEP:g} in the recipe; e.g. lr {DP_SGD_STEP / 0.1:g} with "
        "max-grad-norm 0.1): give both or neither, one alone is refused; not used in dp-mode 'distributed'")
    optimizer: Literal["adamw", "sgd"] = Field(
        "sgd", alias="local-optimizer", description="'sgd' with momentum (chosen on the sites' validation parts, "
        "docs/results.md) or 'adamw'; not used in dp-mode 'distributed'")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of local-optimizer 'sgd', and the server momentum "
                            "of strategy 'fedavgm' (in either dp-mode)")
    weight_decay: float = Field(1e-4, alias="weight-decay", ge=0, description="decay of the Linear weights; it scales "
                                "with lr: each local step shrinks a weight by lr x weight-decay of itself (SGD's momentum "
                                "amplifies it, AdamW decays it as w (1 - lr x weight-decay)), so lr x weight-decay >= 1 is "
                                f"refused; at the DP recipe's lr {RECIPES['dp'].lr['sgd']:g} use at most "
                                f"{0.1 / RECIPES['dp'].lr['sgd']:g}; not used in dp-mode 'distributed'")
    warmup_fraction: float = Field(0.1, alias="warmup-fraction", ge=0, lt=1, description="share of the run's local "
                                   "steps the learning rate warms up over (then cosine decay); not used in dp-mode "
                                   "'distributed'")
    softmax: Literal["all", "site"] = Field(
        "all", alias="local-softmax", description="'site': each site's loss is a softmax over the cancer types it "
        "has training patients of (FedRS, alpha 0), for label-skewed federations; without DP only")
    seed: int = Field(0, ge=0, lt=2**31, description="the run's public seed (model initialisation; splits)")

    @field_validator("batch_size", "lr", mode="before")
    @classmethod
    def _number_or_auto(cls, v, info: ValidationInfo):
        positive = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        if v == "auto" or (positive and (info.field_name == "lr" or v == int(v))):
            return v
        raise ValueError(f"use {'a number > 0' if info.field_name == 'lr' else 'a whole number >= 1'} or \"auto\" "
                         "(the recipe's)")


def _unused_when_distributed(t: TrainingSection) -> list[str]:
    """The local-training keys set otherwise than their defaults, as 'key value': dp-mode "distributed" takes no
    local step (client/local_round.py distributed_round; FedAdam's eta_l, which Flower is given lr as, is never
    read). A value equal to its default is not told apart from one left out: Flower merges the defaults in."""
    fields = TrainingSection.model_fields
    default = {"lr": RECIPES["dp"].lr.get(t.optimizer)} | {
        name: fields[name].default for name in ("local_epochs", "optimizer", "weight_decay", "warmup_fraction")}
    return [f"{fields[name].alias or name} {getattr(t, name)!r}" if isinstance(getattr(t, name), str)
            else f"{fields[name].alias or name} {getattr(t, name):g}" for name in default
            if getattr(t, name) != default[name]]


class SiteSection(_Section):
    """What a site holds back and what it may report."""

    val_fraction: float = Field(0.2, alias="val-fraction", ge=0, lt=1, description="site's local held-out part")
    min_count: int = Field(MIN_COUNT, alias="min-count", ge=1, description="counts below this are never reported")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection
    federation: FederationSection = FederationSection()
    secagg: SecAggSection = SecAggSection()
    privacy: PrivacySection = PrivacySection()
    training: TrainingSection = TrainingSection()
    site: SiteSection = SiteSection()
    model: ModelConfig = ModelConfig()

    @model_validator(mode="wrap")
    @classmethod
    def _file_flat_keys(cls, data: Any, handler) -> "RunConfig":
        """Flower's flat keys into their sections (a nested dict passes as it is), and "auto" resolved from
        the recipe of the run's dp and local optimizer; then, the config valid, the checks that need to know
        which of the recipe's values the user gave (a wrap validator: after resolving, only the values are left)."""
        if not isinstance(data, dict):
            return handler(data)
        out: dict[str, Any] = {k: dict(v) for k, v in data.items() if k in SECTIONS and isinstance(v, dict)}
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                continue
            if key in FLAT_KEYS:
                section, name = FLAT_KEYS[key]
                out.setdefault(section, {})[name] = value
            else:
                out[key] = value  # unknown: extra="forbid" names it
        privacy, training = out.setdefault("privacy", {}), out.setdefault("training", {})
        dp = privacy.get("enabled", privacy.get("dp", PrivacySection.model_fields["enabled"].default))
        try:  # as the field will read it ("false", 0, "no" are False): the recipe must be the one of the dp that runs
            dp = TypeAdapter(bool).validate_python(dp)
        except ValidationError:
            pass  # not a boolean: the field's own check names it
        mode = privacy.get("mode", privacy.get("dp-mode", PrivacySection.model_fields["mode"].default))
        recipe = RECIPES["dp" if dp is not False else "no-dp"]
        optimizer = training.get("optimizer", training.get("local-optimizer",
                                                           TrainingSection.model_fields["optimizer"].default))
        distributed = dp is not False and mode == "distributed"
        bound = DISTRIBUTED_MAX_GRAD_NORM if distributed else recipe.max_grad_norm.get(optimizer)
        rate = privacy.get("sample_rate", privacy.get("sample-rate", PrivacySection.model_fields["sample_rate"].default))
        try:  # as the field will read it; out of range or not a number: the field's own check names it
            rate = TypeAdapter(float).validate_python(rate)
        except ValidationError:
            rate = None
        batch = (auto_batch_size(dp is not False, distributed, rate) if rate is not None and 0 < rate <= 1
                 else None)
        model = out.setdefault("model", {})
        explicit: set[str] = set()
        for section, name, alias, value in ((training, "batch_size", "batch-size", batch),
                                            (training, "lr", "lr", recipe.lr.get(optimizer)),
                                            (privacy, "max_grad_norm", "max-grad-norm", bound),
                                            (model, "modality_dropout", "modality-dropout", recipe.modality_dropout),
                                            (model, "fusion_blocks", "fusion-blocks",
                                             DISTRIBUTED_FUSION_BLOCKS if distributed else recipe.fusion_blocks)):
            given = section.pop(alias, section.get(name, "auto"))
            section[name] = value if given == "auto" and value is not None else given
            if given != "auto":
                explicit.add(alias)
        cfg = handler(out)
        if why := _half_given_step(cfg, explicit):
            raise ValueError(why)
        return cfg

    @property
    def new_run(self) -> bool:
        """Not a resume or a delivery: a run started before a new run's check resumes and delivers as it trained."""
        return not (self.run.resume or self.run.deliver_only)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        fed, sa, dp = self.federation, self.secagg, self.privacy
        # a new run only: a run started before this check keeps its frozen value to resume and deliver (its sites
        # refuse only the rounds where Flower's rounding comes to half the share holders); so too for the local
        # recipe's checks below (a resume may not change the run's settings, and a delivery trains nothing)
        new_run = self.new_run
        if sa.enabled and new_run and (why := threshold_refusal(sa.threshold)):
            raise ValueError(why)
        if dp.enabled and self.site.val_fraction == 0:
            raise ValueError("val-fraction 0 with dp: a DP site fits its normalisation on half its held-out part, "
                             "which would be empty, so every site would refuse every round; use val-fraction > 0 "
                             f"({SiteSection.model_fields['val_fraction'].default:g} by default) or dp = false")
        floor = max(fed.min_sites, dp.trusted_sites if dp.mode == "distributed" else 0)
        if sa.enabled and floor > SECAGG_MAX_SHARES:
            raise ValueError(f"min-sites / trusted-sites {floor} exceeds {SECAGG_MAX_SHARES}, the most SecAgg+ neighbours a "
                             "site shares keys with: every site would refuse to help unmask every round; lower it to "
                             f"at most {SECAGG_MAX_SHARES}")
        if fed.sites and fed.min_sites > fed.sites:
            raise ValueError(f"min-sites {fed.min_sites} exceeds sites {fed.sites}: the server would wait for {fed.sites} "
                             f"sites while each site asks for {fed.min_sites} before it helps unmask a sum; lower "
                             "min-sites or raise sites")
        if sa.enabled and (fed.min_sites < 2 or fed.sites == 1):
            raise ValueError("SecAgg+ needs at least 2 sites in every sum (a sum of one is one site's update, and "
                             "every site refuses to help unmask it): set min-sites (and sites) to 2 or more, or "
                             "secagg = false for a single site")
        if dp.enabled and dp.mode == "site" and dp.pad_to and not dp.pad_batches:
            raise ValueError(f"dp-pad-to {dp.pad_to} with dp-pad-batches = false: the bound pads only padded batches, "
                             "so the training steps would still cost what each site's sample is and its seconds would "
                             "tell its size; set dp-pad-batches = true or drop dp-pad-to")
        if fed.strategy == "fedprox" and fed.proximal_mu == 0:
            raise ValueError("strategy 'fedprox' with proximal-mu 0 is FedAvg; set proximal-mu > 0 or use fedavg")
        if dp.mode == "distributed":
            from math import frexp

            problems = []
            if not dp.enabled:
                problems.append("needs dp = true")
            if not sa.enabled:
                problems.append("needs secagg = true: without SecAgg+ the server sees each site's share, whose noise "
                                "alone is 1/trusted-sites of what the guarantee assumes")
            if fed.strategy not in ("fedavgm", "fedadam"):
                problems.append(f"steps a server optimizer: set strategy to 'fedavgm' (momentum) or 'fedadam', not "
                                f"{fed.strategy!r}")
            if frexp(sa.clipping_range)[0] != 0.5:
                problems.append(f"needs secagg-clipping-range a power of two (got {sa.clipping_range:g}): "
                                "the sites' grid values must pass SecAgg+'s scaling exactly")
            if sa.max_weight != int(sa.max_weight):
                problems.append(f"needs a whole secagg-max-weight (got {sa.max_weight:g})")
            if dp.trusted_sites > (fed.sites or fed.min_sites):
                problems.append(f"trusted-sites {dp.trusted_sites} exceeds the run's "
                                + (f"{fed.sites} sites" if fed.sites else f"min-sites {fed.min_sites} (sites 0)")
                                + ": no round could ever be unmasked; set sites to the number of hospitals or lower "
                                "trusted-sites")
            if dp.enabled and new_run and (unused := _unused_when_distributed(self.training)):
                problems.append(f"takes one DP-SGD step of the whole consortium per round, at the server: "
                                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used there (the step is "
                                "server-lr with the strategy's optimizer, over each site's sample-rate Poisson sample "
                                f"of gradients clipped to max-grad-norm); remove {'it' if len(unused) == 1 else 'them'} "
                                "or use dp-mode 'site'")
            if problems:
                raise ValueError("dp-mode 'distributed' " + "; ".join(problems))
        t = self.training
        if new_run and not dp.distributed and t.lr * t.weight_decay >= 1:
            # SGD adds wd x w to the gradient, so a step decays w by lr x wd of itself (momentum 0.9 up to 10x that);
            # AdamW multiplies w by 1 - lr x wd: at 1 the decay takes the whole weight, beyond it flips or diverges
            raise ValueError(f"weight-decay {t.weight_decay:g} with lr {t.lr:g}: lr x weight-decay = "
                             f"{t.lr * t.weight_decay:g}, and each local step decays every Linear weight by lr x "
                             "weight-decay of itself (SGD's momentum amplifies it; AdamW multiplies the weight by 1 - "
                             "lr x weight-decay), so at 1 or more the weights vanish, flip sign or diverge; lower "
                             f"weight-decay to at most {0.1 / t.lr:.3g} at lr {t.lr:g} (lr x weight-decay <= 0.1; the "
                             f"default is {TrainingSection.model_fields['weight_decay'].default:g}) or lower lr")
        if dp.enabled and self.training.softmax == "site":
            raise ValueError("local-softmax 'site' takes each site's set of cancer types from its labels, which "
                             "DP-SGD's analysis does not cover; use local-softmax 'all' with dp, or dp false")
        return self

    def train_config(self) -> "TrainConfig":
        """The local training loop's configuration for a site's round (a view of `training`, `privacy`, `site`).

        Under DP the loss is not class-weighted: weights computed from the site's label counts would make
        every sample's gradient depend on the other patients' labels, a release DP-SGD's analysis does not
        cover (and per-sample clipping largely undoes a weighting anyway). For the same reason the run config
        refuses a softmax over the site's own classes (`local-softmax = "site"`) together with DP."""
        from shared_models.training import TrainConfig  # torch: only where a model is trained

        t = self.training
        return TrainConfig(lr=t.lr, weight_decay=t.weight_decay, epochs=t.local_epochs, batch_size=t.batch_size,
                           warmup_fraction=t.warmup_fraction, max_grad_norm=self.privacy.max_grad_norm, seed=t.seed,
                           class_weighting=not self.privacy.enabled,
                           softmax_over="present" if t.softmax == "site" else "all",
                           optimizer=t.optimizer, momentum=t.momentum)

    def flat(self) -> dict:
        """The run config as Flower's flat keys (`lr`, `d-model`, ...), "auto" values resolved."""
        return {alias: getattr(getattr(self, section), name) for alias, (section, name) in FLAT_KEYS.items()
                if alias == _alias(section, name)}

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        base = self.run.base_dir
        return p if p.is_absolute() or not base else Path(base) / p

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
                key, field = _flat_key(err["loc"])
                hint = {"extra_forbidden": "unknown key: check its spelling against [tool.flwr.app.config]",
                        "missing": "add it to [tool.flwr.app.config] or pass --run-config"}.get(err["type"], "")
                if err["type"] == "extra_forbidden" and (keys := _keys_of_field(str(key))):
                    hint = f"unknown key: the run config's key is {' or '.join(repr(k) for k in keys)}"
                elif err["type"] == "extra_forbidden" and (close := closest_key(str(key), FLAT_KEYS)):
                    hint = f"unknown key: did you mean {close!r}?"
                if not hint and field is not None and field.description:
                    hint = field.description  # what the setting means and its limits
                    if max_epsilon is not None:
                        hint = hint.replace("privacy.MAX_BUDGET", f"{max_epsilon:g} (privacy.MAX_BUDGET)")
                got = f" (got {err['input']!r})" if field is not None and err["type"] != "missing" and "input" in err \
                    else ""
                lines.append(f"  - {key}: {err['msg'].removeprefix('Value error, ')}{got}" + (f"; {hint}" if hint else ""))
            raise RunConfigError("\n".join(lines)) from None


def _half_given_step(cfg: RunConfig, explicit: set[str]) -> str:
    """Why lr or max-grad-norm given without the other would train otherwise than its user thinks ("" if not).
    Under DP with SGD in dp-mode "site" the recipe's bound clips every patient's gradient (automatic clipping), so
    a step scales with lr x max-grad-norm, and the other key's "auto" keeps the recipe's value for the recipe's
    partner: lr 1 alone made each round's update 1/100 of the recipe's, max-grad-norm 1 alone 100x (which every
    site then refused under SecAgg+, naming secagg-clipping-range). `explicit`: the keys given other than "auto"."""
    t, dp = cfg.training, cfg.privacy
    if not (dp.enabled and dp.mode == "site" and t.optimizer == "sgd") or len(explicit & {"lr", "max-grad-norm"}) != 1:
        return ""
    if not cfg.new_run:
        return ""
    lr0, c0, step = RECIPES["dp"].lr["sgd"], RECIPES["dp"].max_grad_norm["sgd"], DP_SGD_STEP
    lr, c = t.lr, dp.max_grad_norm
    if (lr, c) == (lr0, c0):
        return ""  # the one given is the recipe's own value
    given, value, other, auto, pair = (("lr", lr, "max-grad-norm", c0, f"max-grad-norm {step / lr:g} with lr {lr:g}")
                                       if "lr" in explicit else
                                       ("max-grad-norm", c, "lr", lr0, f"lr {step / c:g} with max-grad-norm {c:g}"))
    return (f"{given} {value:g} with {other} \"auto\" (the DP recipe's {auto:g}): under DP with local-optimizer 'sgd' in "
            f"dp-mode 'site' every patient's gradient is clipped to max-grad-norm, so a step scales with lr x "
            f"max-grad-norm, {step:g} in the recipe (lr {lr0:g} with max-grad-norm {c0:g}, or e.g. max-grad-norm 0.1 "
            f"with lr {step / 0.1:g}) and {lr * c:g} here: {lr * c / step:g} times the recipe's update. Give both lr and "
            f"max-grad-norm (e.g. {pair}) or neither")


SECTIONS: dict[str, type[BaseModel]] = {name: f.annotation for name, f in RunConfig.model_fields.items()}


def _keys_of_field(name: str) -> list[str]:
    """The documented keys of the fields called `name` (or `name` with dashes for underscores)."""
    want = name.replace("-", "_")
    return sorted(_alias(s, n) for s, c in SECTIONS.items() for n in c.model_fields if n == want and _alias(s, n) != name)


def _alias(section: str, name: str) -> str:
    return SECTIONS[section].model_fields[name].alias or name


FLAT_KEYS: dict[str, tuple[str, str]] = {
    _alias(section, name): (section, name) for section, cls in SECTIONS.items() for name in cls.model_fields}
"""Every flat key -> (section, field name). Only the documented keys (the aliases, unique across sections): a field
name (`enabled` is both secagg's and privacy's, `num_rounds` is not a key pyproject declares) is refused as
unknown here, not passed on for Flower to refuse without naming it."""
assert len({_alias(s, n) for s, c in SECTIONS.items() for n in c.model_fields}) == \
    sum(len(c.model_fields) for c in SECTIONS.values()), "a flat run-config key is defined in two sections"


def _flat_key(loc: tuple) -> tuple[str, Any]:
    """The flat key a validation error's location names, and its field (None for a whole-config error)."""
    if loc and loc[0] in SECTIONS:
        fields = SECTIONS[loc[0]].model_fields
        if len(loc) == 1:
            return ("schema", fields["schema_path"]) if loc[0] == "run" else ("(run config)", None)
        name = next((n for n, f in fields.items() if loc[1] in (n, f.alias)), None)
        if name is not None:
            return _alias(loc[0], name), fields[name]
    return (".".join(str(k) for k in loc) or "(run config)"), None


def defaults() -> dict:
    """The flat key -> default of every setting that has one: what `[tool.flwr.app.config]` must list."""
    return {_alias(s, n): f.default for s, c in SECTIONS.items() for n, f in c.model_fields.items()
            if not f.is_required()}


APP_SCHEMA = "simulations/schemas/tcga_pancan33.json"
"""The schema the project's Flower app runs with when a run sets none (the only value pyproject adds)."""


def pyproject_block() -> str:
    """`[tool.flwr.app.config]` as pyproject.toml must have it: every default, a comment line per section."""
    import json

    def toml(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)

    lines = ["[tool.flwr.app.config]",
             "# generated from shared_models/run_config.py (python -m shared_models.run_config); a test compares them"]
    for section, cls in SECTIONS.items():
        lines.append(f"# {section}")
        for name, f in cls.model_fields.items():
            lines.append(f"{_alias(section, name)} = {toml(APP_SCHEMA if f.is_required() else f.default)}")
    return "\n".join(lines) + "\n"


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


def _text_keys() -> set[str]:
    """The run-config keys whose value is text only (run-name, paths): a value TOML would type otherwise (a date, a
    number) is kept as written."""
    return {f.alias or name for section in RunConfig.model_fields.values()
            for name, f in getattr(section.annotation, "model_fields", {}).items() if f.annotation is str}


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
        if key.strip() in _text_keys() and not isinstance(out[key.strip()], str):  # run-name=2026-12-06: a name
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


if __name__ == "__main__":
    print(pyproject_block(), end="")
