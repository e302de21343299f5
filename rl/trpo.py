"""Trust region policy optimisation: conjugate gradient on Fisher-vector products of the mean KL,
then a backtracking line search (Schulman et al. 2015, "Trust Region Policy Optimization",
section 6 and appendix C).

Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary; ``mask`` [B, T] is 1 on real
response tokens. Parameters are handled as one flat vector ``N`` long over the *given* parameters
only, so any trainable subset works: a whole small model, some layers, or LoRA adapters.

Double backpropagation through attention: transformers' default ``sdpa`` attention has no double
backward on CPU (flash kernel) and neither do the flash / memory-efficient kernels on GPU (measured with
torch 2.13: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented"). The Fisher-vector product therefore runs ``kl_fn`` / ``logits_fn`` inside
``math_attention()`` (``sdpa_kernel(SDPBackend.MATH)``); models loaded with
``attn_implementation="eager"`` need nothing. Models that call a non-sdpa fused kernel (e.g.
flash-attn 2) must be switched to eager or sdpa by the caller.

Memory of ``trpo_step``: about 6 flat copies of the trainable parameters (old parameters, gradient,
CG's x, r, p and Ap; the full step reuses one), plus one double-backprop graph of the KL
(activations, the first backward graph, and whatever old log-probs [B, T, V] the kl_fn holds), kept
through CG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.masked import masked_mean


@dataclass(frozen=True)
class CGResult:
    """Approximate solution of A x = b by conjugate gradient."""

    x: Tensor  # [N]
    residual: float  # r·r = ||b - A x||^2 at exit
    iterations: int  # A-products taken (each costs one Fisher-vector product)


@dataclass(frozen=True)
class TRPOResult:
    """What one TRPO update did. Parameters hold the accepted trial, or are unchanged if none."""

    accepted_index: int | None  # trial accepted (step = backtrack_coef**index * full step), or None
    step_size: float  # β = sqrt(2 max_kl / sᵀ(F + damping I)s) scaling the natural-gradient direction s
    trial_kls: list[float]  # mean KL(π_old || π_trial) of every trial, in order
    trial_losses: list[float]  # surrogate loss (to minimise) of every trial, in order
    loss_before: float  # surrogate loss at the old parameters
    expected_improvement: float  # -gᵀ(β s): the first-order predicted decrease of the full step
    cg_residual: float  # ||-g - (F + damping I) s||^2 at the end of conjugate gradient
    cg_iterations: int
    grad_norm: float = 0.0  # ||g||, the surrogate's gradient L2 norm at the old parameters

    @property
    def accepted(self) -> bool:
        return self.accepted_index is not None


@contextmanager
def math_attention() -> Iterator[None]:
    """Force PyTorch's math backend for ``scaled_dot_product_attention``: the only backend with a
    double backward (needed by Fisher-vector products). No effect on models without sdpa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def conjugate_gradient(
    fvp: Callable[[Tensor], Tensor], b: Tensor, *, iters: int = 10, residual_tol: float = 1e-10
) -> CGResult:
    """Solve A x = b for symmetric positive-definite A given only v -> A v, from x0 = 0
    (Hestenes & Stiefel 1952; as used in Schulman et al. 2015, appendix C).

    Args:
        fvp: [N] -> [N], the product with A (for TRPO, the damped Fisher-vector product).
        b: [N] right-hand side.
        iters: maximum number of A-products; exact in exact arithmetic when iters >= N.
        residual_tol: stop once the squared residual r·r <= residual_tol.

    Returns:
        CGResult(x [N], residual = r·r at exit, iterations taken). Stops early, keeping the current x,
        if A turns out not positive definite along a search direction (pᵀAp <= 0).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = float(r @ r)
    taken = 0
    for _ in range(iters):
        if rdotr <= residual_tol:
            break
        ap = fvp(p)
        pap = float(p @ ap)
        if not pap > 0.0:
            break
        alpha = rdotr / pap
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        new_rdotr = float(r @ r)
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
        taken += 1
    return CGResult(x=x, residual=rdotr, iterations=taken)


def mean_categorical_kl(logits: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of the exact KL(π_old || π) between full next-token distributions:
    Σ_v π_old(v) (log π_old(v) - log π(v)): the trust-region constraint of Schulman et al. 2015.

    Args:
        logits: [B, T, V] current policy logits (or log-probs) at the response positions; gradients
            flow here. Padded positions are ignored but must be finite (model outputs are).
        old_logprobs: [B, T, V] log π_old over the vocabulary (detached).
        mask: [B, T] 1 on real response tokens.

    Returns:
        [] masked token mean; 0 if there are no real tokens. Half-precision logits are upcast to fp32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    new = torch.log_softmax(logits, dim=-1)
    old = old_logprobs.detach().to(new.dtype)
    p_old = old.exp()
    # Vocabulary entries with π_old = 0 (log π_old = -inf) contribute 0, not 0 * inf = NaN.
    terms = torch.where(p_old > 0, p_old * (old - new), torch.zeros((), dtype=new.dtype, device=new.device))
    return masked_mean(terms.sum(dim=-1), mask.bool())


def _flat(tensors: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter tensors into one [N] vector; None (unused parameter) gives zeros."""
    pairs = zip(tensors, params, strict=True)
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in pairs])


def make_fisher_vector_product(
    kl_fn: Callable[[], Tensor], params: Sequence[Tensor], *, damping: float = 0.1,
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Build v -> (H + damping I) v with H the Hessian of ``kl_fn()`` w.r.t. ``params`` at their
    current values, by double backpropagation (Pearlmutter 1994; Schulman et al. 2015, appendix C.1).
    At π = π_old the Hessian of the mean KL(π_old || π) is the Fisher information matrix.

    ``kl_fn`` runs once, with ``create_graph=True``; every product then costs one backward pass
    through the retained graph, never a materialised Hessian. The graph is freed with the closure.
    Both run inside ``math_attention()``: sdpa's fused kernels have no double backward.

    Args:
        kl_fn: () -> [] scalar, differentiable w.r.t. params (e.g. ``mean_categorical_kl``).
        params: the N trainable tensors, in the order of the flat vectors.
        damping: added times the identity (Tikhonov damping) to keep the system well conditioned.
        all_sum: see ``trpo_step``: the Hessian-vector products of the ranks' KL shares are summed
            before the damping is added (once).
    """
    params = list(params)
    total = all_sum or _same
    with math_attention():
        kl = kl_fn()
        grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    flat_grad = _flat(grads, params)

    def fvp(v: Tensor) -> Tensor:
        v = v.detach().to(flat_grad.dtype)
        if not flat_grad.requires_grad:  # the KL is at most linear in params: H = 0
            return damping * v
        with math_attention():
            hv = torch.autograd.grad(flat_grad @ v, params, retain_graph=True, allow_unused=True)
        return total(_flat(hv, params)) + damping * v

    return fvp


def fisher_vector_product(
    logits_fn: Callable[[], Tensor],
    old_logprobs: Tensor | None,
    mask: Tensor,
    params: Sequence[Tensor],
    v: Tensor,
    *,
    damping: float = 0.1,
) -> Tensor:
    """(F + damping I) v with F the Hessian of the mean KL(π_old || π) over real tokens (see
    ``mean_categorical_kl``), by double backpropagation. One-shot form of
    ``make_fisher_vector_product``: build that once when taking several products.

    Args:
        logits_fn: () -> [B, T, V] current logits at the response positions (runs the model).
        old_logprobs: [B, T, V] log π_old (detached), or None for the current policy's own
            log-probs, detached: the start of a TRPO step, where the Hessian is the Fisher matrix.
        mask: [B, T] 1 on real response tokens.
        params: the N trainable tensors. v: [N]. damping: times the identity.

    Returns:
        [N] the product, in the flat order of ``params``.
    """

    def kl_fn() -> Tensor:
        logits = logits_fn()
        old = torch.log_softmax(logits.detach(), dim=-1) if old_logprobs is None else old_logprobs
        return mean_categorical_kl(logits, old, mask)

    return make_fisher_vector_product(kl_fn, params, damping=damping)(v)


def _same(x: Tensor) -> Tensor:
    return x


def _trainable(params: Iterable[Tensor] | torch.nn.Module) -> list[Tensor]:
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("trpo_step got no parameter with requires_grad=True: pass the tensors to train")
    return trainable


def _write_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    # In-place copies keep each parameter's storage and dtype (vector_to_parameters would rebind
    # .data to views of `flat`, aliasing the parameters and casting them to flat's dtype).
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@dataclass(frozen=True)
class _LineSearch:
    accepted_index: int | None
    kls: list[float]
    losses: list[float]


def _line_search(
    params: Sequence[Tensor],
    old_flat: Tensor,
    full_step: Tensor,
    loss_fn: Callable[[], Tensor],
    kl_fn: Callable[[], Tensor],
    loss_before: float,
    max_kl: float,
    backtrack_coef: float,
    max_backtracks: int,
    total: Callable[[Tensor], Tensor],
) -> _LineSearch:
    kls: list[float] = []
    losses: list[float] = []
    for index in range(max_backtracks):
        _write_flat(params, old_flat + backtrack_coef**index * full_step)
        with torch.no_grad():
            loss, kl = total(torch.stack([loss_fn().detach().double(), kl_fn().detach().double()])).tolist()
        kls.append(kl)
        losses.append(loss)
        # NaN fails both comparisons, so a non-finite trial is rejected.
        if kl <= max_kl and loss < loss_before:
            return _LineSearch(index, kls, losses)
    _write_flat(params, old_flat)
    return _LineSearch(None, kls, losses)


@dataclass(frozen=True)
class _Direction:
    loss_before: float  # surrogate loss at the old parameters
    grad: Tensor  # [N] g, its gradient
    cg: CGResult  # cg.x [N]: s ≈ -(F + damping I)^-1 g
    step_size: float | None  # β; None when sᵀFs is not finite and positive (no usable direction)


def _natural_direction(
    params: Sequence[Tensor],
    loss_fn: Callable[[], Tensor],
    fisher_kl_fn: Callable[[], Tensor],
    all_sum: Callable[[Tensor], Tensor] | None,
    *,
    max_kl: float,
    damping: float,
    cg_iters: int,
    cg_residual_tol: float,
) -> _Direction:
    """Steps 1 and 2 of ``trpo_step`` at the current (old) parameters. The Fisher-vector product's
    KL graph is freed when this returns, before the line search."""
    total = all_sum or _same
    loss = loss_fn()
    loss_before = float(total(loss.detach().double()))
    grad = total(_flat(torch.autograd.grad(loss, params, allow_unused=True), params).detach())
    fvp = make_fisher_vector_product(fisher_kl_fn, params, damping=damping, all_sum=all_sum)
    cg = conjugate_gradient(fvp, -grad, iters=cg_iters, residual_tol=cg_residual_tol)
    shs = float(cg.x @ fvp(cg.x))
    if not (math.isfinite(shs) and shs > 0.0):
        return _Direction(loss_before, grad, cg, None)
    return _Direction(loss_before, grad, cg, math.sqrt(2.0 * max_kl / shs))


def _result(
    direction: _Direction, full_step: Tensor | None = None, search: _LineSearch | None = None
) -> TRPOResult:
    """The TRPOResult of one step; without ``full_step`` [N] (β s) and ``search`` nothing was tried."""
    search = search or _LineSearch(None, [], [])
    return TRPOResult(
        accepted_index=search.accepted_index,
        step_size=direction.step_size or 0.0,
        trial_kls=search.kls,
        trial_losses=search.losses,
        loss_before=direction.loss_before,
        expected_improvement=0.0 if full_step is None else -float(direction.grad @ full_step),
        cg_residual=direction.cg.residual,
        cg_iterations=direction.cg.iterations,
        grad_norm=float(direction.grad.norm()),
    )


def trpo_step(
    params: Iterable[Tensor] | torch.nn.Module,
    loss_fn: Callable[[], Tensor],
    kl_fn: Callable[[], Tensor],
    *,
    max_kl: float = 0.01,
    damping: float = 0.1,
    cg_iters: int = 10,
    cg_residual_tol: float = 1e-10,
    backtrack_coef: float = 0.8,
    max_backtracks: int = 10,
    fisher_kl_fn: Callable[[], Tensor] | None = None,
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> TRPOResult:
    """One TRPO update, in place (Schulman et al. 2015, section 6 and appendix C).

    1. g = ∇ loss; s ≈ -(F + damping I)^-1 g by ``cg_iters`` conjugate-gradient steps on
       Fisher-vector products of ``kl_fn`` (double backprop; see ``make_fisher_vector_product``).
    2. β = sqrt(2 max_kl / sᵀ(F + damping I)s): the step whose quadratic KL model equals max_kl.
    3. Trials θ_old + backtrack_coef^i β s, i = 0 .. max_backtracks - 1: accept the first whose
       KL <= max_kl and whose loss is strictly below the loss before (improvement > 0). If none is
       accepted, the parameters are restored exactly.

    Args:
        params: the trainable tensors (a model's, a subset of layers', LoRA adapters'), or a module,
            whose parameters with requires_grad are used.
        loss_fn: () -> [] surrogate loss to minimise at the current parameters, on fixed data: e.g.
            ``-(exp(logprobs - old_logprobs) * advantages)`` aggregated over real tokens.
        kl_fn: () -> [] mean KL(π_old || π) at the current parameters, π_old frozen; e.g.
            ``mean_categorical_kl(model(x)[...], old_logprobs, mask)``. Differentiable; it is also
            evaluated under no_grad in the line search.
        max_kl: the trust region δ. damping: Tikhonov damping of the Fisher matrix.
        cg_iters, cg_residual_tol: see ``conjugate_gradient``.
        backtrack_coef, max_backtracks: line-search shrink factor and number of trials.
        fisher_kl_fn: the mean KL whose Hessian the conjugate gradient uses, when it differs from
            ``kl_fn``: the KL over a subsample of the batch makes every Fisher-vector product cheaper
            (OpenAI Baselines' TRPO uses every 5th sample), while the trust region is still checked
            with ``kl_fn`` over the whole batch in the line search. None: ``kl_fn``.
        all_sum: data-parallel ranks: a tensor summed over them (the same result on every rank). Each
            rank's ``loss_fn``, ``kl_fn`` and ``fisher_kl_fn`` then return its share of the batch's
            value (its rows, divided by the whole batch's normaliser), and the losses, KLs, gradient
            and Fisher-vector products are summed: every rank takes the one-rank step. None: one rank.

    Returns:
        TRPOResult. With no usable direction (zero gradient or a non-positive sᵀFs) nothing is tried.
    """
    params = _trainable(params)
    old_flat = torch.nn.utils.parameters_to_vector([p.detach() for p in params])
    direction = _natural_direction(
        params, loss_fn, fisher_kl_fn or kl_fn, all_sum,
        max_kl=max_kl, damping=damping, cg_iters=cg_iters, cg_residual_tol=cg_residual_tol,
    )
    if direction.step_size is None:
        return _result(direction)
    full_step = direction.step_size * direction.cg.x
    search = _line_search(
        params, old_flat, full_step, loss_fn, kl_fn, direction.loss_before, max_kl, backtrack_coef,
        max_backtracks, all_sum or _same,
    )
    return _result(direction, full_step, search)
