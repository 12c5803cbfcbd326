"""DP-SGD's per-sample clipping without per-sample gradients ("book-keeping" mixed ghost clipping).

DP-SGD needs, for a batch of B samples with losses l_i, the clipped sum

    sum_i c_i g_i,   g_i = d l_i / d theta,   c_i = min(1, C / (||g_i|| + 1e-6))

(then Gaussian noise of std sigma*C and a division by the expected batch size). Opacus' hooks mode
materialises g_i for every parameter: a B x parameters tensor (64 x 613k on the BRCA shape), most of
it for the wide and linear paths over 12,503 features. Nothing here materialises it:

- a Linear applied to one row per sample (activation a_i, output gradient e_i) has g_i = e_i a_i^T,
  so ||g_i|| = ||a_i|| ||e_i||: a B-vector from the activations autograd already holds;
- a Linear applied to T tokens per sample has g_i = sum_t e_it a_it^T; its squared norm is
  <a_i a_i^T, e_i e_i^T> (Gram matrices, T x T: "ghost" norm, Li et al. 2021) or sum(g_i^2) with g_i
  materialised for that one layer (B x out x in), whichever is cheaper for the shape (mixed ghost
  clipping, Bu et al. 2022); a Linear called k times per forward is one Linear over all k calls'
  tokens, so the cross terms between calls are counted;
- NumericTokens (v x scale_c, or missing_c, per tabular column c): both norms in closed form from the
  output gradient's per-column squared norms (B x columns), never B x columns x d;
- every other parameter (LayerNorm gains, embeddings, the other learned arrays of
  shared_models/layers.py) is small: its per-sample gradients are materialised with Opacus' own
  registered rules, and summed over calls when a layer is called more than once (LayerNorms' by the
  same rule written here: every LayerNorm of one width in one stacked tensor, cheaper than one rule call
  per layer);
- the clipped sum is then formed from the same activations and output gradients, weighted by c_i,
  in the same backward pass (book-keeping, Bu et al. 2023): sum_i c_i e_i a_i^T is one matmul, the
  cost of the plain step's weight gradient, which the Linear layers' autograd backward here skips.

Everything else stays Opacus': Poisson sampling (DPDataLoader's, or privacy/sampling.py's padded batches of
the same sampling), the noise (N(0, (sigma C)^2) on every
coordinate, then division by the expected batch size, as Opacus' DPOptimizer, in distribution; drawn in one
flat tensor that the clipped sums are added into, see BookKeepingDPOptimizer) and the accountant (the same optimizer step hook). `make_private` mirrors
`PrivacyEngine.make_private`.

Dropout and missing modalities need nothing special: each sample's activations and output gradients
are its own (its dropout masks, its key mask), so the recorded ones give its exact gradient.
tests/test_dp_clipping.py checks every layer type and the whole model with missing modalities against
a float64 per-sample loop (<= 1e-9 relative), and the step against Opacus' hooks-mode step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import Tensor, nn

from shared_models.layers import AddLearned, FeatureFill, NumericTokens, numeric_parts, register_grad_samplers

register_grad_samplers()  # the learned arrays' per-sample rules, for the clipper and for Opacus' hooks mode

# Opacus' per-sample clip factor, to the constant: C / (norm + 1e-6), at most 1.
_NORM_EPS = 1e-6
_ONES: dict[tuple, Tensor] = {}  # (dtype, device) -> a 0-dim 1, baddbmm's input for a Gram matrix + 1


def _one(t: Tensor) -> Tensor:
    key = (t.dtype, t.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=t.dtype, device=t.device)
    return one


class _Installed:
    """A function the clipper installs on a layer while attached (its taped forward, a recording hook). It refuses
    to be copied: a deep copy of an attached model would keep calling it, computing with the original model's
    parameters and recording into its tapes, and would train wrong without a sign of it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __deepcopy__(self, memo):
        raise RuntimeError("a model with a BookKeepingClipper attached cannot be deep-copied (the copy would compute "
                           "with this model's parameters): copy it before attaching or after clipper.detach(), or "
                           "copy its state_dict()")

    def __reduce_ex__(self, protocol):
        raise RuntimeError("a model with a BookKeepingClipper attached cannot be pickled: save its state_dict(), or "
                           "detach the clipper first")


class _TapedLinear(torch.autograd.Function):
    """F.linear whose backward hands (input, output gradient) to the tape instead of computing the
    weight and bias gradients: the clipper forms their clipped sum itself."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tape: list) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        ctx.tape.record(x, grad_out)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _grad_samplers() -> dict:
    return GradSampleModule.GRAD_SAMPLERS


class _LinearTape(list):
    """One Linear layer's (activation, output gradient) pairs of the last backward, and the number of forward
    calls they come from. When the backward has reached every call and this layer's norms come from its
    materialised per-sample gradients, those are formed at once and the pairs dropped: materialising is
    chosen when the per-sample gradients are the smaller of the two (T (in + out) >= in x out), so holding
    them until the step lowers the step's peak memory (on the BRCA shape the chunk-token layers' pairs
    were the largest entries of the tapes)."""

    def __init__(self, layer: nn.Linear, token_norm: str):
        super().__init__()
        self.layer, self.token_norm = layer, token_norm
        self.calls = 0            # forward calls with gradients since the last reset
        self.prepared = None      # the materialised per-sample gradients (a _Prepared), once formed
        self._routes: dict[tuple, str] = {}  # (tokens of one call, weight trained) -> its route

    def __bool__(self) -> bool:
        return len(self) > 0 or self.prepared is not None

    def reset(self) -> None:
        self.clear()
        self.calls, self.prepared = 0, None

    def append_pair(self, x: Tensor, grad_out: Tensor) -> None:
        self.append((x, grad_out))
        if self.calls > 1 and len(self) == self.calls:  # a layer's last call of several: their tokens add up
            self._prepare_if_materialised()

    def may_materialise(self, x: Tensor) -> bool:
        """Whether this call's tokens alone route the layer to materialising (more calls only add tokens)."""
        shape = x.shape
        key = (math.prod(shape[1:-1]), self.layer.weight.requires_grad)  # tokens per sample (no tensor op)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _linear_route(self.layer.weight, key[0], self.token_norm)
        return route == "materialise"

    def record(self, x: Tensor, grad_out: Tensor) -> None:
        self.append((x, grad_out))
        self._prepare_if_materialised()

    def _prepare_if_materialised(self) -> None:
        # calls still to come, or rows that may not be batch-major: prepared at the step (a second backward over
        # one forward leaves pairs beside the prepared gradients, which the step refuses)
        if self.prepared is not None or len(self) != self.calls or any(a.dim() < 3 for a, _ in self):
            return
        batch = self[0][1].shape[0]
        if batch == 0 or any(g.shape[0] != batch for _, g in self):
            return
        tokens = sum(a[0].numel() // a.shape[-1] for a, _ in self)
        if _linear_route(self.layer.weight, tokens, self.token_norm) == "materialise":
            with torch.no_grad():
                self.prepared = _prepare_one_linear(self.layer, list(self), batch, self.token_norm)
            self.clear()


class BookKeepingClipper:
    """Records what each parameterised layer sees during forward and backward, then writes
    p.grad = sum_i c_i g_i for every trainable parameter of `model`.

        clipper = BookKeepingClipper(model, max_grad_norm=C).attach()
        loss_fn(model(x), y).backward()     # loss = sum_i l_i / B  (loss_reduction="mean")
        norms = clipper.clip_()             # per-sample gradient norms (B,); p.grad = clipped sum
        clipper.detach()

    The per-sample gradient is that of B * loss with respect to sample i's terms, as Opacus takes
    it for loss_reduction="mean"; with "sum" the loss is taken as sum_i l_i.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, loss_reduction: str = "mean",
                 token_norm: str = "auto"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if token_norm not in ("auto", "ghost", "materialise"):
            raise ValueError(f"token_norm must be 'auto', 'ghost' or 'materialise'; got {token_norm!r}")
        if torch.get_float32_matmul_precision() != "highest":  # TF32 or bfloat16 inside float32 matmuls
            raise RuntimeError(f"torch.set_float32_matmul_precision({torch.get_float32_matmul_precision()!r}) is set: "
                               "the per-sample norms' rounding bound (_ghost_sq) assumes full float32 matmuls; set "
                               "it back to 'highest' before DP training")
        self.model, self.max_grad_norm, self.loss_reduction = model, float(max_grad_norm), loss_reduction
        self.token_norm = token_norm  # how a Linear over several tokens per sample gets its norms ("auto": cheaper)
        self._linears: list[tuple[nn.Linear, _LinearTape]] = []   # (layer, tape of (activation, output grad))
        self._others: list[tuple[nn.Module, list]] = []    # (layer, tape), per-sample grads by Opacus' rules
        self._attached = False
        self._plan(model)

    # --- which layers, and how -------------------------------------------------------------------
    def _plan(self, model: nn.Module) -> None:
        samplers = _grad_samplers()
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            for p in params:
                if id(p) in owner:
                    raise ValueError(
                        f"parameter of {name or 'the model'} is also owned by {owner[id(p)]}: a parameter shared by "
                        "two modules is not supported by the book-keeping clipper; untie it, or train with "
                        "clipping='opacus'")
                owner[id(p)] = name or "the model"
            if type(module) is nn.Linear:
                self._linears.append((module, _LinearTape(module, self.token_norm)))
            elif type(module) is NumericTokens:
                self._others.append((module, []))
            elif type(module) in samplers:
                self._others.append((module, []))
            else:
                raise ValueError(
                    f"{name} ({type(module).__name__}) owns trainable parameters but has no per-sample gradient rule: "
                    "register one with opacus.grad_sample.register_grad_sampler (see shared_models/layers.py), or "
                    "train with clipping='opacus'")

    def attach(self) -> "BookKeepingClipper":
        if self._attached:
            return self
        for layer, tape in self._linears:
            layer.forward = _Installed(_taped_forward(layer, tape))  # instance attribute: shadows nn.Linear.forward
        for layer, tape in self._others:
            if type(layer) in (NumericTokens, FeatureFill):
                layer.param_grads = False  # the clipper writes them: the backward's own sums would be discarded
            if type(layer) is FeatureFill:  # its backward hands over the per-sample gradients, (None, (B, F)) a call
                layer.sample_grads = tape
                continue
            # an AddLearned's per-sample gradient is its output gradient: its input is not kept
            layer.forward = _Installed(_recording_forward(layer, tape, type(layer) is not AddLearned))
        self._attached = True
        return self

    def detach(self) -> None:
        for layer, tape in self._linears:
            if "forward" in layer.__dict__:
                del layer.forward
            tape.reset()
        for layer, tape in self._others:
            if "forward" in layer.__dict__:
                del layer.forward
            if type(layer) in (NumericTokens, FeatureFill):
                layer.param_grads = True
            if type(layer) is FeatureFill:
                layer.sample_grads = None
            tape.clear()
        self._attached = False

    def __enter__(self) -> "BookKeepingClipper":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    cleanup = detach  # the name of Opacus' hooks object's method, so callers treat both alike

    def clear(self) -> None:
        """Forget what the last forward and backward recorded (zero_grad calls it)."""
        for _, tape in self._linears:
            tape.reset()
        for _, tape in self._others:
            tape.clear()

    @property
    def parameters(self) -> list[Tensor]:
        out = []
        for layer, _ in self._linears + self._others:
            out += [p for p in layer.parameters(recurse=False) if p.requires_grad]
        return out

    # --- the clipped sum -------------------------------------------------------------------------
    @torch.no_grad()
    def clip_(self, scale: float = 1.0, into=None) -> Tensor:
        """Write p.grad = scale x sum_i c_i g_i (every trainable parameter) from the recorded backward; return
        the per-sample gradient norms ||g_i||. Raises if no backward was recorded. (The DP optimizer passes
        scale = 1 / expected batch: the division folded into the clip weights costs no pass over the gradients.)
        `into`: a function called once the tapes have passed their checks, returning None or {parameter: tensor
        of its shape}; the sums are then added into these tensors in place, which become the gradients (the DP
        optimizer's noise: the addition costs no pass of its own). Each such tensor must receive exactly one sum."""
        if not any(tape for _, tape in self._linears + self._others):
            raise RuntimeError("no backward pass was recorded since the last step: call loss.backward() with the "
                               "clipper attached before clip_()")
        batch = self._batch_size()
        loss_scale = float(batch) if self.loss_reduction == "mean" else 1.0
        prepared = _prepare_linear(self._linears, batch, self.token_norm) + _prepare_other(self._others, batch)
        sq = _total_sq(prepared)  # per-sample squared norms of the (unscaled) gradients
        finite = torch.isfinite(sq)
        if not bool(finite.all()):
            # a sample whose gradient is not finite (overflow) counts as a zero gradient: norm 0 <= C, so the
            # sensitivity holds, and the sum stays finite instead of making the site withdraw from the round
            # where the server sees it (samples never mix, so only its own rows are not finite)
            for item in prepared:
                item.keep_rows(finite)
            sq = torch.where(finite, sq, torch.zeros((), dtype=sq.dtype))
        norms = sq.clamp_min(0).sqrt() * loss_scale
        weights = (self.max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0) * (loss_scale * scale)  # c_i x scales
        sink = _GradSink(into() if into is not None else None)
        column = weights.view(-1, 1)
        for item in prepared:
            item.write_grads(weights, sink, column)
        sink.check_complete()
        self.clear()
        return norms

    def _batch_size(self) -> int:
        for _, tape in self._linears + self._others:
            if len(tape):
                return tape[0][1].shape[0]
        for _, tape in self._linears:
            if tape.prepared is not None:
                return tape.prepared.batch()
        return 0


def _keep_rows(t: Tensor | None, keep: Tensor) -> Tensor | None:
    """A per-sample (batch-major) tensor with the rows of the samples not in `keep` set to zero."""
    if t is None:
        return t
    rows = t.reshape(keep.shape[0], -1)
    return torch.where(keep.view(-1, 1), rows, torch.zeros((), dtype=t.dtype)).reshape(t.shape)


def _taped_forward(layer: nn.Linear, tape: list):
    """The layer's forward while the clipper is attached. An input that needs a gradient takes torch's own
    linear with the parameters detached (autograd's C++ backward computes the input's gradient and no
    parameter gradient) and a hook on the output that tapes (input, output gradient): ~15 us a call less than
    the Python autograd Function, which an input without a gradient (the model's data) still takes, since
    nothing would run the hook's backward there."""
    params = layer._parameters  # the same Parameters as layer.weight, layer.bias, without the Module's lookup

    def forward(x: Tensor) -> Tensor:
        w, b = params["weight"], params["bias"]
        if not torch.is_grad_enabled():
            return F.linear(x, w, b)
        tape.calls += 1
        if x.requires_grad:
            out = F.linear(x, w.detach(), None if b is None else b.detach())
            # a call whose own tokens already make the layer materialise its per-sample gradients takes the
            # tape's full record (which may form them in the backward); any other only appends its pair
            record = tape.record if x.dim() > 2 and tape.may_materialise(x) else tape.append_pair
            _tape_output_grad(out, tape, x.detach(), record)
            return out
        return _TapedLinear.apply(x, w, b, tape)
    return forward


def _recording_forward(layer: nn.Module, tape: list, keep_input: bool = True):
    """The layer's forward while the clipper is attached: its class's forward, then a hook on the output's
    autograd node that tapes (input, output gradient). (An instance forward, not a module forward hook: a
    hook sends every call of the module through nn.Module's slow call path.)"""
    forward = type(layer).forward

    def taped(x, *args, **kwargs):
        out = forward(layer, x, *args, **kwargs)
        if isinstance(out, Tensor) and out.requires_grad:  # (False when grad is disabled)
            _tape_output_grad(out, tape, x.detach() if keep_input else None)
        return out
    return taped


def _tape_output_grad(out: Tensor, tape, activation: Tensor | None, record=None) -> None:
    """Call record(activation, out's gradient) (default: append the pair to tape) when the backward reaches out's
    autograd node: a pre-hook on the node (grad_outputs[out.output_nr] is out's gradient), ~1.5 us cheaper to
    register than Tensor.register_hook's Python wrapper. Like a tensor hook, it is not called without a gradient."""
    node, i = out.grad_fn, out.output_nr
    if record is None:
        def hook(grads):
            if grads[i] is not None:
                tape.append((activation, grads[i]))
    else:
        def hook(grads):
            if grads[i] is not None:
                record(activation, grads[i])
    if node is None:  # a leaf (the forward returned its input): a tensor hook, which leaves have
        out.register_hook(lambda grad: hook((grad,)))
    else:
        node.register_prehook(hook)


def _sq_norms(t: Tensor) -> Tensor:  # (B, ...) -> (B,) squared norms, one pass without a t**2 temporary
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def _total_sq(prepared: list) -> Tensor:
    """The per-sample squared norms of all items' gradients together: the items that give squared norms summed,
    plus the squared norm of those that give norms (one vector_norm over them: no square per item)."""
    sqs = [item.sq for item in prepared if item.sq is not None]
    norms = [item.norm for item in prepared if item.norm is not None]
    sq = torch.stack(sqs).sum(0) if sqs else None
    if norms:
        n_sq = torch.linalg.vector_norm(torch.stack(norms), dim=0).square()
        sq = n_sq if sq is None else sq + n_sq
    return sq


class _Prepared:
    """One or more layers' per-sample squared norms (sq, (B,)) or norms (norm, (B,): the other None) and how to
    write their clipped, summed gradients: write(weights, sink, **rows), from the per-sample (batch-major) tensors
    in rows."""

    __slots__ = ("sq", "norm", "_write", "rows")

    def __init__(self, sq: Tensor | None, write, norm: Tensor | None = None, **rows: Tensor | None):
        self.sq, self.norm, self._write, self.rows = sq, norm, write, rows

    def batch(self) -> int:
        return (self.sq if self.sq is not None else self.norm).shape[0]

    def write_grads(self, weights: Tensor, sink: "_GradSink", column: Tensor | None = None) -> None:
        self._write(weights, sink, **self.rows)

    def keep_rows(self, keep: Tensor) -> None:
        """Zero the rows of the samples not in `keep` (their gradient counts as zero; a zero weight would not
        do: 0 x inf is NaN)."""
        self.rows = {k: _keep_rows(t, keep) for k, t in self.rows.items()}
        self._keep_norm_rows(keep)

    def _keep_norm_rows(self, keep: Tensor) -> None:
        if self.sq is not None:
            self.sq = torch.where(keep, self.sq, torch.zeros((), dtype=self.sq.dtype))
        if self.norm is not None:
            self.norm = torch.where(keep, self.norm, torch.zeros((), dtype=self.norm.dtype))


class _PreparedLinear(_Prepared):
    """A Linear layer on the row or Gram route: its norms (row) or squared norms (Gram), and its clipped sum from
    the recorded activations a and output gradients e, (B, in), (B, out) or (B, T, in), (B, T, out). w, b: the
    trained parameters (None: frozen)."""

    __slots__ = ("w", "b", "a", "e")

    def __init__(self, sq: Tensor | None, norm: Tensor | None, w: Tensor | None, b: Tensor | None, a: Tensor,
                 e: Tensor):
        self.sq, self.norm, self.w, self.b, self.a, self.e = sq, norm, w, b, a, e

    def write_grads(self, weights: Tensor, sink: "_GradSink", column: Tensor | None = None) -> None:
        # sum_i c_i e_i^T a_i as one matmul over all samples' tokens; the bias's, the column sums
        e, w, b = self.e, self.w, self.b
        if e.dim() == 2:  # rows: the bias's sum is e^T c, one matrix-vector product
            if w is not None:
                sink.mm(w, (e * (weights.view(-1, 1) if column is None else column)).t(), self.a)
            if b is not None:
                sink.mv(b, e.t(), weights)
            return
        d_out = e.shape[-1]
        ew = (e * weights.view(-1, 1, 1)).view(-1, d_out)
        if w is not None:
            sink.mm(w, ew.t(), self.a.reshape(-1, self.a.shape[-1]))
        if b is not None:
            sink.set(b, ew.sum(0))

    def keep_rows(self, keep: Tensor) -> None:
        self.a, self.e = _keep_rows(self.a, keep), _keep_rows(self.e, keep)
        self._keep_norm_rows(keep)


class _GradSink:
    """Where the clipped sums go: p.grad = the sum, or with `into` (the DP optimizer's noise, one tensor of p's shape
    per parameter) p.grad = into[p] + the sum, added in place (a Linear's weight on the row and Gram routes by
    addmm_: its sum and the addition in one pass over the gradient). With `into`, each of its parameters must
    receive exactly one sum: a second raises (twice the sensitivity), and so does none (`check_complete`)."""

    __slots__ = ("into", "unwritten", "written")

    def __init__(self, into: dict | None = None):
        # keyed by id (a Tensor's __hash__ is a Python call); `unwritten` loses each parameter as it is written
        self.into = None if into is None else {id(p): t for p, t in into.items()}
        self.unwritten = None if into is None else dict(self.into)
        self.written = set()  # the written parameters not in `into`

    def _dest(self, p: Tensor) -> Tensor | None:
        if self.into is None:
            return None
        key = id(p)
        dest = self.unwritten.pop(key, None)
        if dest is None:
            if key in self.into or key in self.written:  # a second sum into the same noise: twice the sensitivity
                raise RuntimeError("the clipper wrote a parameter's clipped sum twice in one step: a bug in its plan")
            self.written.add(key)
        return dest

    def check_complete(self) -> None:
        if self.into is not None and (missing := self.unwritten):
            raise RuntimeError(f"the clipper wrote no clipped sum for {len(missing)} of the optimizer's parameters: "
                               "they would step on noise alone")

    def set(self, p: Tensor, value: Tensor) -> None:  # value has p's shape
        dest = self._dest(p)
        if dest is None:
            p.grad = value if value.dtype == p.dtype else value.to(p.dtype)
        else:
            p.grad = dest.add_(value)

    def mm(self, p: Tensor, m1: Tensor, m2: Tensor) -> None:  # the sum is m1 @ m2
        dest = self._dest(p)
        if dest is None:  # (not through set: that would count this parameter's one write twice)
            value = m1 @ m2
            p.grad = value if value.dtype == p.dtype else value.to(p.dtype)
        else:
            p.grad = dest.addmm_(m1, m2) if m1.dtype == dest.dtype else dest.add_(m1 @ m2)

    def mv(self, p: Tensor, m: Tensor, v: Tensor) -> None:  # the sum is m @ v, p's elements in order
        if v.dtype != m.dtype:
            v = v.to(m.dtype)
        dest = self._dest(p)
        if dest is None:
            value = (m @ v).view_as(p)
            p.grad = value if value.dtype == p.dtype else value.to(p.dtype)
        elif m.dtype == dest.dtype and dest.is_contiguous():
            dest.view(-1).addmv_(m, v)
            p.grad = dest
        else:
            p.grad = dest.add_((m @ v).view_as(dest))

    def zero(self, p: Tensor) -> None:
        dest = self._dest(p)
        p.grad = torch.zeros_like(p) if dest is None else dest


def _zero_grads(params: list[Tensor], batch: int) -> _Prepared:  # layers not used in this forward, or an empty batch
    def write(_, sink: _GradSink):
        for p in params:
            sink.zero(p)
    return _Prepared(params[0].new_zeros(batch), write)


def _prepare_linear(linears: list, batch: int, token_norm: str) -> list[_Prepared]:
    """Every Linear layer's norms and how to write its clipped sum; the unused ones' zeros as one item."""
    items, zeros = [], []
    for layer, tape in linears:
        if tape.prepared is not None:  # materialised during the backward
            if len(tape) or tape.prepared.batch() != batch:
                raise RuntimeError("the clipper's tapes are inconsistent (a backward pass after the per-sample "
                                   "gradients were formed?): zero_grad() before each forward")
            items.append(tape.prepared)
        elif (n := len(tape)) > tape.calls:
            raise RuntimeError("the clipper recorded more backward passes than forward calls of a layer (a second "
                               "backward over one forward?): zero_grad() before each forward")
        elif n == 0 or batch == 0:  # not used in this forward, or an empty (Poisson) batch: a zero sum
            zeros += [p for p in layer.parameters(recurse=False) if p.requires_grad]
        else:
            items.append(_prepare_one_linear(layer, tape, batch, token_norm))
    return items + [_zero_grads(zeros, batch)] if zeros else items


def _linear_route(weight: Tensor, tokens: int, token_norm: str) -> str:
    """How a Linear layer (its weight) over `tokens` tokens per sample gets its per-sample norms: "row" (one token:
    the product of two norms), "ghost" (Gram matrices, O(T^2 (in + out))) or "materialise" (O(T in out))."""
    d_out, d_in = weight.shape
    if tokens == 1 or not weight.requires_grad:
        return "row"
    if token_norm == "auto":
        return "ghost" if tokens * (d_in + d_out) < d_in * d_out else "materialise"
    return token_norm


def _prepare_one_linear(layer: nn.Linear, tape: list, batch: int, token_norm: str) -> _Prepared:
    # Every torch call here costs ~2 us whatever its size, and a step prepares ~35 Linear layers: at small batches
    # the call count, not the arithmetic, is this function's cost, so each route below uses as few calls as it can.
    params = layer._parameters  # (not the Module's __getattr__: the same Parameters, without its lookup chain)
    w, b = params["weight"], params["bias"]
    train_w, train_b = w.requires_grad, b is not None and b.requires_grad
    d_out, d_in = w.shape
    if len(tape) == 1:
        a, e = tape[0]
    else:  # every call's tokens (a row is one token) side by side: (B, T, in), (B, T, out)
        a = torch.cat([a.reshape(batch, -1, d_in) for a, _ in tape], dim=1)
        e = torch.cat([g.reshape(batch, -1, d_out) for _, g in tape], dim=1)
    if a.dtype != e.dtype:
        a = a.to(e.dtype)
    tokens = a.numel() // (batch * d_in)
    # The bias's per-sample gradient is sum_t e_it, the weight's with an input of ones: the bias folds
    # into the weight's norm as one more input feature (a row of ones, or +1 on every Gram entry).
    if tokens == 1:  # ||e a^T|| = ||a|| ||e||, and with the bias ||(a, 1)|| ||e||: rows (B, in), (B, out)
        if a.dim() != 2:
            a = a.reshape(batch, d_in)
        if e.dim() != 2:
            e = e.reshape(batch, d_out)
        e_norm = torch.linalg.vector_norm(e, dim=1)
        if train_w:
            a_norm = torch.linalg.vector_norm(a, dim=1)
            norm = (torch.hypot(a_norm, _one(a_norm)) if train_b else a_norm).mul_(e_norm)
        else:
            norm = e_norm if train_b else e.new_zeros(batch)
        return _PreparedLinear(None, norm, w if train_w else None, b if train_b else None, a, e)
    route = _linear_route(w, tokens, token_norm)
    if route == "materialise":  # this layer's per-sample gradients, kept for the weighted sum; a and e are dropped
        a, e = a.reshape(batch, tokens, d_in), e.reshape(batch, tokens, d_out)
        per_sample_w = torch.bmm(e.transpose(1, 2), a)  # (B, out, in)
        sq = _sq_norms(per_sample_w)
        bias_ps = None
        if train_b:
            bias_ps = e.sum(1)  # (B, out)
            sq = sq + _sq_norms(bias_ps)
        return _Prepared(sq, _write_materialised(w, b if train_b else None, batch), ws=per_sample_w, bs=bias_ps)
    if a.dim() != 3:
        a = a.reshape(batch, tokens, d_in)
    if e.dim() != 3:
        e = e.reshape(batch, tokens, d_out)
    if route == "row":  # a frozen weight over several tokens: the bias's per-sample gradient alone
        if not train_b:
            return _PreparedLinear(None, e.new_zeros(batch), None, None, a, e)
        # its tokens' sum, plus what another order of summing them (the weighted sum's) can differ by (_ghost_sq)
        spread = torch.linalg.vector_norm(e, dim=2).sum(1)
        norm = torch.linalg.vector_norm(e.sum(1), dim=1).add_(spread, alpha=1.01 * torch.finfo(e.dtype).eps / 2 * tokens)
        return _PreparedLinear(None, norm, None, b, a, e)
    # ghost norm: <a a^T (+ 1 for the bias), e e^T>, made safe against rounding (_ghost_sq)
    gram = torch.baddbmm(_one(a), a, a.mT) if train_b else torch.bmm(a, a.mT)
    prod = gram.mul_(torch.bmm(e, e.mT))
    return _PreparedLinear(_ghost_sq(prod, d_in + train_b, d_out, tokens), None, w, b if train_b else None, a, e)


def _ghost_sq(prod: Tensor, d_in: int, d_out: int, tokens: int) -> Tensor:
    """The per-sample squared norms a ghost-route Linear counts, from prod = (a a^T) * (e e^T), (B, T, T), never
    below the squared norm of what its weighted sum writes for the sample, whatever the rounding.

    In float32 the sum over prod loses its digits when the tokens' terms cancel (sum_t e_t a_t^T small, each term
    large): it can come out far below the true squared norm, or <= 0 (norm 0, clip factor 1), while the clipped sum,
    formed by another matmul, writes the sample's gradient at its true size: 86 C in a review's construction
    (2026-12-06; tests/test_dp_clipping.py::test_in_float32_a_sample_whose_tokens_cancel_adds_at_most_c). With S =
    sum_t ||a_t|| ||e_t||, the sum's rounding error is at most k_sum S^2 (each Gram entry's dot product, their
    product, the T^2 entries' sum: the standard bound, n u per length-n sum), and what the weighted sum writes for
    the sample differs from its exact gradient by at most k_write S (its T tokens' terms summed, as materialising it
    would), so (sqrt(max(sum, 0) + k_sum S^2) + k_write S)^2 bounds the written vector's squared norm; it is at most
    max(sum, 0) + (k_sum + 3 k_write) S^2 (the exact norm is at most S, and 2 k_write + k_write^2 <= 3 k_write; the
    3 also covers the T + 1 roundings of the weighted sum, k_write counting T), and S^2 is at most T tr(prod)
    (Cauchy-Schwarz; tr(prod) = sum_t ||a_t||^2 ||e_t||^2, computed within k_sum): so on this route a sample adds at
    most C, with full float32 matmuls (BookKeepingClipper refuses TF32). The other routes compute the norm and the
    written sum from the same tensors, which agree to float32 rounding (C (1 + 1e-6):
    tests/test_dp_clipping.py::test_in_float32_the_routes_that_norm_what_they_write_...). The price, 4 small ops per
    layer: on random tokens tr(prod) ~ the squared norm, and the norm counted is ~T k_sum / 2 above the true one,
    2.1e-4 at 16 tokens of width 64 (the clip factor 0.02% smaller); in float64 ~1e-13."""
    u = torch.finfo(prod.dtype).eps / 2  # the unit roundoff
    k_sum, k_write = 1.01 * u * (d_in + d_out + tokens * tokens + 2), 1.01 * u * tokens
    trace = prod.diagonal(dim1=1, dim2=2).sum(1)
    return prod.sum((1, 2)).clamp_min_(0).add_(trace, alpha=tokens * (k_sum + 3 * k_write) * (1 + 3 * k_sum))


def _write_materialised(w: Tensor, b: Tensor | None, batch: int):
    def write(weights: Tensor, sink: _GradSink, ws: Tensor, bs: Tensor | None) -> None:
        sink.set(w, (weights @ ws.reshape(batch, -1)).view_as(w))
        if b is not None:
            sink.set(b, weights @ bs)
    return write


def _prepare_numeric_tokens(layer: NumericTokens, tape: list, batch: int, added: AddLearned | None = None) -> _Prepared:
    """v * scale_c or missing_c per column c: per sample, scale's gradient is e_ic v_ic and missing's
    e_ic [v_ic missing], so both norms come from ||e_ic||^2 (B x columns), never B x columns x d.

    `added`: an AddLearned (the column identities) applied to exactly these tokens, whose output gradient
    is the same tensor e: its per-sample gradient is e_i itself, so its norm is sum_c ||e_ic||^2 from the
    same (B, C) and its weighted sum one more row of the same batched matmul: two passes over e for both
    layers instead of four (e is B x 301 x 64 on the pan-cancer mutation table, 39 MB at batch 512)."""
    (x, e), = tape
    value, missing = (t.to(e.dtype) for t in numeric_parts(x))
    if layer.pooled:
        return _prepare_pooled_numeric_tokens(layer, value, missing, e, batch, added)
    e_sq = torch.linalg.vector_norm(e, dim=-1).square()  # (B, C), one pass without an e**2 temporary
    sq = e.new_zeros(batch)
    if layer.scale.requires_grad:
        sq = sq + (value.pow(2) * e_sq).sum(1)
    if layer.missing.requires_grad:
        sq = sq + (missing * e_sq).sum(1)
    added_trained = added is not None and added.weight.requires_grad
    if added_trained:
        sq = sq + e_sq.sum(1)

    def write(weights: Tensor, sink: _GradSink, value: Tensor, missing: Tensor, e: Tensor) -> None:
        # sum over b of w_bc e_bcd for every parameter in one batched matmul over the columns, (C, k, B) @ (C, B, d):
        # one pass over e (measured at 301 columns: 0.5x einsum's two passes at batch 64, 0.7x at 512; a
        # broadcast product and sum was 3x slower at 512). The (C, k, B) factor is built contiguous: a
        # permuted view of it made the matmul 4x slower at batch 64.
        # (parameter, its per-sample factor per column; None: the column identities', 1 for every column)
        params = [(p, f) for p, f in ((layer.scale, value), (layer.missing, missing)) if p.requires_grad]
        if added_trained:
            params.append((added.weight, None))
        rows = [weights.expand(e.shape[1], -1) if f is None else f.t() * weights for _, f in params]
        sums = torch.bmm(torch.stack(rows, 1), e.transpose(0, 1))  # (C, k, d)
        for i, (p, _) in enumerate(params):
            sink.set(p, sums[:, i].contiguous())
    return _Prepared(sq, write, value=value, missing=missing, e=e)


def _prepare_pooled_numeric_tokens(layer: NumericTokens, value: Tensor, missing: Tensor, e: Tensor, batch: int,
                                   added: AddLearned | None) -> _Prepared:
    """A pooled NumericTokens (the sum of its tokens, (B, d): a Linear over [value, missing flags] without
    bias) and the pooled AddLearned over its output, if fused: every column's output gradient is the sum's, e_i,
    so scale's per-sample gradient is v_i e_i^T (norm ||v_i|| ||e_i||), missing's m_i e_i^T, and the identities'
    e_i in each of their n rows (norm^2 n ||e_i||^2)."""
    # the norm: ||e_i|| sqrt(||v_i||^2 + ||m_i||^2 + n), in as few torch calls as it takes
    factor = None  # the per-sample squared norm of the factors that multiply e_i
    if layer.scale.requires_grad:
        factor = torch.linalg.vector_norm(value, dim=1).square_()
    if layer.missing.requires_grad:
        flags = missing.sum(1)  # 0/1 flags: m^2 = m
        factor = flags if factor is None else factor.add_(flags)
    added_trained = added is not None and added.weight.requires_grad
    if added_trained:
        n = added.weight.shape[0]
        factor = e.new_full((batch,), float(n)) if factor is None else factor.add_(n)
    norm = e.new_zeros(batch) if factor is None else factor.sqrt_().mul_(torch.linalg.vector_norm(e, dim=1))

    def write(weights: Tensor, sink: _GradSink, value: Tensor, missing: Tensor, e: Tensor) -> None:
        ew = e * weights.view(-1, 1)  # (B, d)
        for p, f in ((layer.scale, value), (layer.missing, missing)):
            if p.requires_grad:
                sink.mm(p, f.t(), ew)
        if added_trained:
            sink.set(added.weight, ew.sum(0).expand_as(added.weight).contiguous())
    return _Prepared(None, write, norm, value=value, missing=missing, e=e)


def _same_tensor_key(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device


def _prepare_other(others: list, batch: int) -> list[_Prepared]:
    """Every other layer's norms and clipped sums, from Opacus' per-sample gradient rules (NumericTokens,
    an AddLearned over its tokens alone, and the used LayerNorms directly)."""
    groups: dict[tuple, list] = {}  # used LayerNorms of one width and eps (and gradients' dtype, device): one item
    numeric = {_same_tensor_key(tape[0][1]): layer for layer, tape in others
               if type(layer) is NumericTokens and len(tape) == 1 and batch}
    added: dict[int, AddLearned] = {}  # id(NumericTokens) -> the AddLearned whose output gradient is its own
    for layer, tape in others:
        if type(layer) is AddLearned and len(tape) == 1 and batch and numeric:
            owner = numeric.get(_same_tensor_key(tape[0][1]))
            if owner is not None and id(owner) not in added and owner.pooled == layer.pooled:  # one form: one rule
                added[id(owner)] = layer
    fused = {id(a) for a in added.values()}
    items = []
    for layer, tape in others:
        if id(layer) in fused:
            continue
        if type(layer) is nn.LayerNorm and tape and batch:
            key = (math.prod(layer.normalized_shape), layer.eps, tape[0][1].dtype, tape[0][1].device)
            groups.setdefault(key, []).append((layer, tape))
        elif type(layer) is NumericTokens and len(tape) == 1 and batch:
            items.append(_prepare_numeric_tokens(layer, tape, batch, added.get(id(layer))))
        elif type(layer) is FeatureFill and tape and batch:
            items.append(_prepare_feature_fill(layer, tape, batch))
        elif type(layer) is AddLearned and len(tape) == 1 and batch and not layer.pooled and layer.weight.requires_grad:
            items.append(_prepare_added(layer, tape[0][1], batch))
        else:
            items.append(_prepare_by_rule(layer, tape, batch))
    return [_prepare_layer_norms(group, batch) for group in groups.values()] + items


def _prepare_feature_fill(layer: FeatureFill, tape: list, batch: int) -> _Prepared:
    """A FeatureFill's per-sample gradients (output gradient x missing mask, (B, F)), handed over by its
    backward; a layer called k times adds its calls' up."""
    per_sample = tape[0][1]
    for _, more in tape[1:]:
        per_sample = per_sample + more
    return _prepare_flat(layer.weight, per_sample.reshape(batch, -1))


def _prepare_added(layer: AddLearned, e: Tensor, batch: int) -> _Prepared:
    """An AddLearned over one call's tokens (not pooled): its per-sample gradient is the output gradient e_i."""
    return _prepare_flat(layer.weight, e.reshape(batch, -1))  # (B, n x d)


def _prepare_flat(w: Tensor, per_sample: Tensor) -> _Prepared:
    """A parameter whose per-sample gradients are given, flattened (B, w.numel()): their norms, and the clipped sum
    as one matrix-vector product."""
    def write(weights: Tensor, sink: _GradSink, per_sample: Tensor) -> None:
        sink.mv(w, per_sample.t(), weights)
    return _Prepared(None, write, torch.linalg.vector_norm(per_sample, dim=1), per_sample=per_sample)


_TOKEN_ROWS: dict[tuple, Tensor] = {}


def _token_rows(batch: int, calls: tuple, device) -> Tensor:
    """For calls ((layer index, tokens per sample), ...) of batch-major rows concatenated: each row's (layer index x
    batch + sample). The same every step of one batch size: kept (~20 torch calls a step less)."""
    key = (batch, calls, device)
    rows = _TOKEN_ROWS.get(key)
    if rows is None:
        if len(_TOKEN_ROWS) >= 64:  # (Poisson batches of many sizes)
            _TOKEN_ROWS.clear()
        rows = _TOKEN_ROWS[key] = torch.cat([i * batch + torch.arange(batch, device=device).repeat_interleave(tokens)
                                             for i, tokens in calls])
    return rows


def _prepare_layer_norms(group: list, batch: int) -> _Prepared:
    """LayerNorms of one width d: per sample, the gain's gradient is sum_t e_t * xhat_t and the bias's
    sum_t e_t (xhat: the input normalised without the affine). Every layer's and call's tokens go
    through one layer_norm and one product, as rows concatenated whole (a concatenation along the
    token dimension was 3x slower), and every trained parameter's per-sample gradients are one
    (B, k, d) tensor: one norm and one matmul for the group instead of Opacus' rule per layer."""
    d, eps = math.prod(group[0][0].normalized_shape), group[0][0].eps
    calls = [(layer_index, a.reshape(-1, d), g.reshape(-1, d)) for layer_index, (_, tape) in enumerate(group)
             for a, g in tape]
    e = torch.cat([g for _, _, g in calls]) if len(calls) > 1 else calls[0][2]  # (every call's B x tokens, d)
    a = torch.cat([a for _, a, _ in calls]) if len(calls) > 1 else calls[0][1]
    prod = F.layer_norm(a.to(e.dtype), (d,), eps=eps).mul_(e)
    if len(calls) == len(group) and all(len(g) == batch for _, _, g in calls):  # one call, one token per sample
        gains, shifts = prod.view(len(group), batch, d), e.view(len(group), batch, d)
    else:  # sum each sample's tokens, and a layer's calls: row r of call c adds to (layer of c, sample of r)
        rows = _token_rows(batch, tuple((i, len(g) // batch) for i, _, g in calls), e.device)
        gains = prod.new_zeros(len(group) * batch, d).index_add_(0, rows, prod).view(len(group), batch, d)
        shifts = e.new_zeros(len(group) * batch, d).index_add_(0, rows, e).view(len(group), batch, d)
    # (B, gain and bias of each layer, d), sample-major in one copy: the norm and the weighted sum over
    # samples then read contiguous rows (on the (k, B, d) layout both were 2x slower)
    per_sample = torch.stack([gains.transpose(0, 1), shifts.transpose(0, 1)], 2).view(batch, 2 * len(group), d)
    params = [p for layer, _ in group for p in (layer.weight, layer.bias)]
    trained = [i for i, p in enumerate(params) if p is not None and p.requires_grad]
    if len(trained) < len(params):
        per_sample, params = per_sample[:, trained], [params[i] for i in trained]
    norm = torch.linalg.vector_norm(per_sample.reshape(batch, -1), dim=1)

    def write(weights: Tensor, sink: _GradSink, per_sample: Tensor) -> None:
        for p, s in zip(params, (weights @ per_sample.reshape(batch, -1)).view(len(params), d)):
            sink.set(p, s.view_as(p))
    return _Prepared(None, write, norm, per_sample=per_sample)


def _prepare_by_rule(layer: nn.Module, tape: list, batch: int) -> _Prepared:
    sampler = _grad_samplers()[type(layer)]
    params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
    per_sample: dict[int, Tensor] = {}
    for activation, grad in tape if batch else ():  # a layer called k times: per-sample gradients of the calls add up
        for p, gs in sampler(layer, [activation], grad).items():
            per_sample[id(p)] = gs if id(p) not in per_sample else per_sample[id(p)] + gs
    ref = tape[0][1] if tape else params[0]
    sq = ref.new_zeros(batch)
    for gs in per_sample.values():
        sq = sq + _sq_norms(gs)

    def write(weights: Tensor, sink: _GradSink, **per_sample: Tensor) -> None:
        for i, p in enumerate(params):
            gs = per_sample.get(str(i))
            if gs is None:
                sink.zero(p)
            else:
                sink.set(p, (weights @ gs.reshape(batch, -1)).view_as(p))
    return _Prepared(sq, write, **{str(i): per_sample[id(p)] for i, p in enumerate(params) if id(p) in per_sample})


def clipped_sum(model: nn.Module, batch_loss, max_grad_norm: float, how: str = "ghost") -> None:
    """p.grad = sum_i c_i g_i for every trainable parameter of `model` (no noise, no division): the sum
    of one batch's clipped per-sample gradients. `batch_loss()` runs the forward and returns the batch's
    mean loss. how = "ghost": the book-keeping clipper above; "opacus": Opacus' hooks-mode per-sample
    gradients and DPOptimizer's own clip_and_accumulate (run config dp-clipping, the reference path)."""
    if how == "ghost":
        with BookKeepingClipper(model, max_grad_norm, loss_reduction="mean") as clipper:
            batch_loss().backward()
            clipper.clip_()
        return
    if how != "opacus":
        raise ValueError(f"how must be 'ghost' or 'opacus'; got {how!r}")
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    hooks = prepare_module(model, "hooks", wrap_model=False, batch_first=True, loss_reduction="mean")
    try:
        optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                expected_batch_size=1, loss_reduction="mean")
        finite_samples_only(optimizer)  # as the sites' Opacus path: an overflowing sample counts as zero
        batch_loss().backward()
        optimizer.clip_and_accumulate()
        for p in params:
            p.grad = p.summed_grad if p.summed_grad is not None else torch.zeros_like(p)
            p.grad_sample, p.summed_grad = None, None
    finally:
        hooks.cleanup()


def _zero_nonfinite_samples(params: list[Tensor]) -> None:
    """Opacus' hooks mode: a sample whose per-sample gradient is not finite (overflow) counts as a zero
    gradient, as in the book-keeping clipper (norm 0 <= C: the sensitivity holds), instead of making the
    clipped sum NaN and the site withdraw, an event the server sees. Call between backward and clipping."""
    grads = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not grads:
        return
    batch = grads[0].shape[0]
    if batch == 0:  # an empty Poisson batch: nothing to zero (reshape(0, -1) would raise)
        return
    finite = torch.ones(batch, dtype=torch.bool, device=grads[0].device)
    for g in grads:
        finite &= torch.isfinite(g.reshape(batch, -1)).all(1)
    if bool(finite.all()):
        return
    for p in params:
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = _keep_rows(p.grad_sample, finite)


def finite_samples_only(optimizer) -> None:
    """Make an Opacus DPOptimizer zero non-finite samples' per-sample gradients before it clips them (its
    pre_step calls clip_and_accumulate; Opacus builds the optimizer, so the instance's method is wrapped)."""
    clip = optimizer.clip_and_accumulate

    def clip_and_accumulate() -> None:
        _zero_nonfinite_samples(optimizer.params)
        clip()
    optimizer.clip_and_accumulate = clip_and_accumulate


# --- DP-SGD with Opacus' sampling, noise and accounting ------------------------------------------
def make_private(engine, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, *,
                 noise_multiplier: float, max_grad_norm: float, poisson_sampling: bool = True,
                 loss_reduction: str = "mean", expected_batch_size: int | None = None):
    """`engine.make_private(..., grad_sample_mode="hooks", wrap_model=False)` with the book-keeping clipper
    in place of Opacus' per-sample gradients: returns (clipper, optimizer, data_loader); the loop is
    unchanged (zero_grad, loss.backward(), optimizer.step()); call clipper.detach() when done.

    `engine` is an opacus.PrivacyEngine: its accountant gets the optimizer's step hook, as in
    make_private. The data loader is Opacus' DPDataLoader (Poisson sampling), or with poisson_sampling=False
    the loader given (the sites pass privacy.sampling.PaddedPoissonLoader: the same sampling, padded, at the
    loader's `sample_rate`); `expected_batch_size` is what the noisy sum is divided by (default Opacus': the
    dataset's size x the sample rate; the sites pass a public number, see client/local_round.py); the
    optimizer is Opacus' DPOptimizerFastGradientClipping (its noise and scaling), whose step first runs the
    clipper.
    """
    if engine.secure_mode:
        raise ValueError("secure_mode needs torchcsprng, unavailable for this torch; create the PrivacyEngine "
                         "without secure_mode (see shared/notes/opacus.md)")
    model_params = set(model.parameters())
    if any(p not in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's: build it from model.parameters()")
    if poisson_sampling:
        # engine.secure_rng: the secret generator of privacy.dp_randomness.private_engine (None: torch's global)
        data_loader = DPDataLoader.from_data_loader(data_loader, distributed=False, generator=engine.secure_rng)
    sample_rate = float(getattr(data_loader, "sample_rate", 1 / len(data_loader)))
    if expected_batch_size is None:  # Opacus' own: from the dataset's size
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
    clipper = BookKeepingClipper(model, max_grad_norm, loss_reduction).attach()
    dp_optimizer = BookKeepingDPOptimizer(
        optimizer, clipper=clipper, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=engine.secure_rng)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return clipper, dp_optimizer, data_loader


class BookKeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' DP optimizer around the sites' optimizer: Opacus' DP-SGD step, with the noise drawn first and the
    clipped sum added into it: noise N(0, (noise_multiplier x max_grad_norm)^2) on every coordinate of every
    trainable parameter, drawn from the optimizer's generator once the clipper's tapes pass their checks, the
    clipper's sum added in, division by the expected batch size (loss_reduction "mean"), the accountant's step
    hook, the wrapped optimizer's step.

    The noise and division are Opacus' DPOptimizer.add_noise and scale_grad in distribution: the noise is
    drawn first, as N(0, (noise_multiplier x max_grad_norm / B)^2), independent per coordinate, in one flat
    tensor whose views become the gradients, and the clipper adds the clipped sum, already divided by the
    expected batch size B (folded into its clip weights), into them in place (a Linear's weight by addmm_ on
    the row and Gram routes).
    Against Opacus' one zeros + normal + add per parameter, its copy of each gradient into summed_grad and a
    pass to divide, that is ~6 kernels per parameter less (~10% of a plain step on this model) and no pass
    of its own for the addition. The gradients are views of that buffer: they hold until the next step draws
    into it again. secure_mode (a sum of Gaussians per coordinate) is refused by make_private."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, clipper: BookKeepingClipper, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.clipper = clipper
        self._noise: Tensor | None = None
        self._noise_views: dict = {}
        self._noise_grads: list = []
        self._noise_key: tuple | None = None
        self._covered: tuple | None = None  # the parameter ids last checked against the clipper's layers

    def pre_step(self, closure=None):
        if self._check_skip_next_step():
            self.clipper.clip_(scale=1.0 / self._divisor())
            self._is_last_step_skipped = True
            return False
        params = self.params  # (Opacus' property walks the parameter groups: read once)
        ids = tuple(map(id, params))
        self._check_covered(params, ids)
        # the noise in one buffer (see _one_buffer) is drawn by the clipper once its tapes pass their checks,
        # before any sum; otherwise it is added per parameter after the clipping
        one_buffer = self._one_buffer(params)
        self.clipper.clip_(scale=1.0 / self._divisor(),
                           into=(lambda: self._draw_noise(params, ids)) if one_buffer else None)
        if not one_buffer:
            self.add_noise_and_scale()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _divisor(self) -> float:  # Opacus' scaling: the expected batch size for loss_reduction "mean"
        return float(self.expected_batch_size * self.accumulated_iterations) if self.loss_reduction == "mean" else 1.0

    def _check_covered(self, params: list[Tensor], ids: tuple) -> None:
        """Every parameter this optimizer steps must be one the clipper writes: a parameter of a layer frozen when the
        clipper was built and trained since would otherwise step on its unclipped gradient (or on noise alone)."""
        if ids == self._covered:
            return
        written = {id(p) for layer, _ in self.clipper._linears + self.clipper._others
                   for p in layer.parameters(recurse=False)}
        if missing := [p for p in params if id(p) not in written]:
            raise RuntimeError(f"{len(missing)} parameter(s) the optimizer steps are not recorded by the clipper (a layer "
                               "frozen when make_private ran and trained since?): call make_private again after "
                               "changing which layers train")
        self._covered = ids

    def _one_buffer(self, params: list[Tensor]) -> bool:
        """Whether the step's noise is drawn into one flat buffer that becomes the gradients: there is noise, and
        every parameter shares a dtype and device (as at the sites)."""
        return self._std() > 0 and bool(params) and len({(p.dtype, p.device) for p in params}) == 1

    def _std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm / self._divisor()

    @torch.no_grad()
    def _draw_noise(self, params: list[Tensor], ids: tuple) -> dict:
        """The step's noise, N(0, (sigma C / B)^2) per coordinate of every parameter (all of one dtype and device),
        drawn in one flat buffer (one buffer for every step: a fresh one was new memory pages each step) whose views
        become the gradients, for the clipper to add the clipped sums to ({parameter: its view})."""
        dtype, device = params[0].dtype, params[0].device
        noise, key = self._noise, (ids, dtype, device)
        if noise is None or self._noise_key != key:
            noise = self._noise = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
            self._noise_views = {p: v.view_as(p) for v, p in zip(noise.split([p.numel() for p in params]), params)}
            self._noise_grads = [self._noise_views[p] for p in params]  # in params' order: no Tensor hash a step
            self._noise_key = key
        noise.normal_(0.0, self._std(), generator=self.generator)
        for p, view in zip(params, self._noise_grads):  # each must then receive exactly one clipped sum (_GradSink
            p.grad = view                                # checks it, else the step raises)
        return self._noise_views

    @torch.no_grad()
    def add_noise_and_scale(self) -> None:
        """Noise on gradients the clipper already divided by the expected batch size: N(0, (sigma C / B)^2) per
        coordinate, Opacus' (sum + N(0, (sigma C)^2)) / B in distribution, without a second pass to divide. (The
        path for parameters of several dtypes or devices; otherwise the noise is drawn before the clipping.)"""
        std = self._std()
        if std > 0:
            for p in self.params:
                p.grad.add_(torch.empty_like(p.grad).normal_(0.0, std, generator=self.generator))

    def zero_grad(self, set_to_none: bool = False):
        self.clipper.clear()
        super().zero_grad(set_to_none)
