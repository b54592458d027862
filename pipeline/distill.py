"""Distillation loss from stored top-k teacher logits, with one bucket for the rest of the mass.

A store keeps, per (sample, view), the teacher's top-k logits z_1..z_k, their class indices and,
for every stored temperature tau, L_tau = logsumexp(z / tau) over ALL classes. That gives the exact
tempered top-k probabilities p_i = exp(z_i / tau - L_tau) and the exact tempered tail mass
r = 1 - sum p_i. The loss compares teacher and student on k + 1 buckets (the k stored classes +
"everything else"): the KL between the two distributions coarsened onto those buckets.

What is exact (up to the store's rounding, measured by benchmarks/bench_kd_fidelity.py):
  - at every stored tau: the coarsened KL above, for one teacher and for an ensemble (on the partition below);
  - k = C: the dense KL at every tau (no tail).
What is not: the coarsened KL is not the dense KL. It leaves out how the teacher spreads its tail
over the C - k other classes; the gap grows with the tempered tail mass (bench_kd_fidelity reports
it per tau). A tau that is NOT stored has no L_tau; `flat_tail=True` (train's --flat-tail) then
models the tail as flat, z_rest = L + log(r) - log(C - k): exact at tau = 1 and for a flat tail,
otherwise it over-estimates the tempered tail for tau > 1 (bench_kd_fidelity's flat_tail figures).

Ensembles. Several teachers are combined as a weighted mean m = sum_j w_j p_j of their (tempered)
probabilities. m(c) is known only where EVERY teacher (of weight > 0) knows p_j(c): on the
INTERSECTION of their top-k sets. The partition is that intersection, one bucket per class, plus one
rest bucket holding everything else, with mass 1 - sum over the intersection of m(c) = sum_j w_j
(r_j + the teacher's top-k mass outside the intersection): exact. It is the finest exact partition: a
bucket holding a class outside some teacher's top-k must hold that teacher's whole tail (its split is
unknown), so it holds every class outside the intersection. A class in A's top-k but not B's is in the
rest bucket, never given B's flat share (that was 5-15 % off at tau 4). Each teacher is scattered into
a dense [B, C] vector (its tail spread flat over its non-top-k classes: the loss only ever uses those
entries summed over the rest bucket, where the sum is exact). With one teacher, or teachers with the
same top-k set, this is exactly the single-store target. Dense [B, C] costs nothing next to the
student's own [B, C] logits.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import UserError


@dataclass
class SoftTarget:
    """Teacher target on the student's classes: probabilities (dense) and which classes are known.

    `probs` [B, C] sums to 1 per row; on `known` classes it is the teacher's value, elsewhere it is
    the tail model, which the loss only ever uses summed (the rest bucket).
    """

    probs: torch.Tensor
    known: torch.Tensor

    def mix(self, lam: float) -> "SoftTarget":
        """Target of a batch mixed with its flip (timm Mixup/CutMix `batch` mode): linear in lam, exact on the
        classes both rows know (a two-teacher ensemble: see the module docstring)."""
        if lam in (0.0, 1.0):
            one = self if lam == 1.0 else SoftTarget(self.probs.flip(0), self.known.flip(0))
            return SoftTarget(one.probs.clone(), one.known.clone())
        return SoftTarget(lam * self.probs + (1 - lam) * self.probs.flip(0), self.known & self.known.flip(0))


def teacher_target(topk_logits, topk_indices, lse, num_classes: int, tau: float = 1.0, lse_tau=None,
                   flat_tail: bool = False) -> SoftTarget:
    """Tempered teacher distribution from one store's top-k logits, scattered onto all classes.

    `lse` is logsumexp(z) over all classes; `lse_tau` is logsumexp(z / tau) (the store keeps it for
    each of its temperatures). Without `lse_tau` at tau != 1 the tempered tail is unknown: refused,
    unless `flat_tail` accepts the flat-tail model.
    """
    z = topk_logits.double()
    topk_indices = topk_indices.long()
    k = z.shape[1]
    known = torch.zeros(z.shape[0], num_classes, dtype=torch.bool, device=z.device)
    known.scatter_(1, topk_indices, True)
    n_rest = num_classes - k
    if n_rest == 0:
        probs = torch.zeros_like(known, dtype=torch.float32).scatter_(1, topk_indices, F.softmax(z / tau, 1).float())
        return SoftTarget(probs, known)
    if lse_tau is None and tau == 1:
        lse_tau = lse
    if lse_tau is None:
        if not flat_tail:
            raise ValueError(f"tau={tau:g} needs logsumexp(z / tau) over all classes (lse_tau) or flat_tail=True")
        return _flat_tail_target(z, topk_indices, lse.double(), known, n_rest, tau)
    # Exact: p_i = exp(z_i / tau - L_tau); rest r = 1 - sum p_i via expm1 in float64 (r is often tiny and
    # 1 - sum would cancel). f16 storage can push sum p_i a hair above 1: then rescale and r = 0.
    logp = z / tau - lse_tau.double()[:, None]
    log_sum = torch.logsumexp(logp, 1)
    rest = -torch.expm1(log_sum.clamp_max(0))
    p = (logp - log_sum.clamp_min(0)[:, None]).exp()
    return _scatter(p, rest, topk_indices, known, n_rest)


def _flat_tail_target(z64, topk_indices, lse, known, n_rest: int, tau: float) -> SoftTarget:
    """The flat-tail model of an unstored tau: the C - k tail classes share one logit, fixed by r at tau 1."""
    rest = -torch.expm1(torch.logsumexp(z64, 1) - lse)
    log_rest = torch.where(rest > 0, rest.clamp_min(1e-300).log(), float("-inf"))
    log_n = torch.log(torch.tensor(float(n_rest), dtype=torch.float64))
    z_rest = lse + log_rest - log_n
    # Normalise over the k logits and the n_rest copies of the tail logit (log n_rest adds the copies).
    p = torch.softmax(torch.cat([z64 / tau, (z_rest / tau + log_n)[:, None]], dim=1), dim=1)
    return _scatter(p[:, :-1], p[:, -1], topk_indices, known, n_rest)


def _scatter(p, rest, topk_indices, known, n_rest: int) -> SoftTarget:
    """Dense [B, C]: the top-k probabilities on their classes, the rest mass spread over the others."""
    probs = (rest.float() / n_rest)[:, None].expand(-1, known.shape[1]).clone()
    probs.scatter_(1, topk_indices, p.float())
    return SoftTarget(probs, known)


def dense_target(teacher_logits, tau: float = 1.0) -> SoftTarget:
    """Target from a teacher's full logits (online KD, or a dense reference): every class known."""
    probs = F.softmax(teacher_logits.float() / tau, dim=1)
    return SoftTarget(probs, torch.ones_like(probs, dtype=torch.bool))


def ensemble_target(stored, num_classes: int, tau: float = 1.0, weights=None, flat_tail: bool = False) -> SoftTarget:
    """Weighted mean of several teachers' probabilities, known on the intersection of the top-k sets of the
    teachers of weight > 0 (module docstring: the finest partition on which the mixture is exact).

    `stored` is [(topk_logits, topk_indices, lse)] or [(topk_logits, topk_indices, lse, lse_tau)].
    """
    weights = [1.0] * len(stored) if weights is None else list(weights)
    if len(weights) != len(stored) or sum(weights) <= 0 or min(weights) < 0:
        raise UserError(f"--teacher-weights {','.join(map(str, weights))}: give one non-negative weight per teacher "
                        f"({len(stored)} teachers), not all zero")
    targets = [teacher_target(*t[:3], num_classes=num_classes, tau=tau, lse_tau=t[3] if len(t) > 3 else None,
                              flat_tail=flat_tail) for t in stored]
    total = sum(weights)
    probs = sum(w / total * t.probs for w, t in zip(weights, targets) if w > 0)
    known = torch.stack([t.known for w, t in zip(weights, targets) if w > 0]).all(0)
    return SoftTarget(probs, known)


class Targets:
    """Teacher targets of a batch's (index, view) pairs from one or more stores (weighted ensemble).

    A student installs each epoch's numbers with `use` (store.StoredViews: its rank's pairs of that epoch,
    read ahead); until then each call reads its pairs from the stores (LogitStore.lookup: for a few batches).
    """

    def __init__(self, stores: list, num_classes: int, tau: float, weights=None, flat_tail: bool = False):
        """`tau` must be stored in every store (exact coarsened KL); else UserError, unless `flat_tail`
        accepts the flat-tail approximation (self.exact is then False)."""
        if weights is not None and len(weights) != len(stores):
            raise UserError(f"{len(weights)} teacher weights given for {len(stores)} teachers")
        self.stores, self.num_classes, self.tau, self.weights = stores, num_classes, tau, weights
        self.exact = all(float(tau) in s.temperatures for s in stores)
        if not self.exact and not flat_tail:
            for store in stores:
                store.require_tau(tau)
        self.sources = list(stores)

    def use(self, views: list) -> None:
        """Serve the targets from `views` (store.StoredViews, one per store, in the stores' order)."""
        self.sources = list(views)

    def __call__(self, index, view, device):
        if self.exact:
            stored = [s.lookup_tau(index, view, self.tau) for s in self.sources]
        else:
            stored = [s.lookup(index, view) for s in self.sources]
        stored = [tuple(t.to(device) for t in s) for s in stored]
        return ensemble_target(stored, self.num_classes, self.tau, self.weights, flat_tail=not self.exact)


def bucket_kl(student_logits, target: SoftTarget, tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) on the known classes + one rest bucket: the batch mean, or per row ("none")."""
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    p = torch.where(target.known, target.probs, 0.0)
    kl = (torch.xlogy(p, p) - p * log_q).sum(1)
    has_rest = ~target.known.all(1)
    if has_rest.any():
        # Rest bucket: teacher tail mass r vs the student's mass on the same (unknown) classes.
        rows = has_rest.nonzero(as_tuple=True)[0]
        r = torch.where(target.known[rows], 0.0, target.probs[rows]).sum(1)  # no 1 - sum cancellation
        log_q_rest = torch.logsumexp(log_q[rows].masked_fill(target.known[rows], float("-inf")), dim=1)
        kl = kl.index_add(0, rows, torch.xlogy(r, r) - r * log_q_rest)
    return kl if reduction == "none" else kl.mean()


def kd_loss(student_logits, labels, target: SoftTarget | None, alpha: float, tau: float = 1.0,
            label_smoothing: float = 0.0) -> dict:
    """(1 - alpha) * CE(student, labels) + alpha * tau^2 * KL(teacher_tau || student_tau).

    `labels` are class indices [B] or soft targets [B, C] (after Mixup/CutMix). alpha = 0 needs no
    target. Returns {"loss", "ce", "kd"} (kd is the unscaled KL; 0 when alpha = 0).
    """
    if labels.dim() == 2:
        ce = torch.sum(-labels * F.log_softmax(student_logits.float(), dim=1), dim=1).mean()
    else:
        ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if alpha == 0:
        kd = ce.new_zeros(())
    else:
        kd = bucket_kl(student_logits, target, tau)
    loss = (1 - alpha) * ce + alpha * tau**2 * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}


def topk_kd_loss(student_logits, topk_logits, topk_indices, lse, tau: float = 1.0, lse_tau=None,
                 flat_tail: bool = False) -> torch.Tensor:
    """KD term (tau^2 * KL) against one store's top-k entries: the contract's single-teacher form."""
    target = teacher_target(topk_logits, topk_indices, lse, student_logits.shape[1], tau, lse_tau, flat_tail)
    return tau**2 * bucket_kl(student_logits, target, tau)
