"""How the teacher store encodes numbers: each array's dtype, and the encode/decode of its targets.

Arrays (row i = sample i of the split, column v = view v):
    values  f32 [N,V,K]   top-k log-probabilities log p = z - lse at tau 1, sorted by class index; stored as
                          int16 steps of 1/181 (the default `logp-s181` encoding; `f16` keeps plain f16)
    indices i16/i32 [N,V,K]  their classes, ascending (int16 whenever the classes fit)
    lse     f32 [N,V]     logsumexp over ALL classes (logits z = values + lse), 10 mantissa bits kept
    rest    u16 [N,V,T]   per stored temperature tau (provenance "temperatures", 1 first): the tempered rest
                          as d_tau = -log(1 - r_tau), r_tau = the mass of softmax(z / tau) off the top-k:
                          d < 1 as its f16 bits (relative 2^-11: a rest of 1e-6 is kept), d >= 1 in steps
                          of 2^-12 (d <= 13.25: a top-k holding >= 1.8e-6 of the tempered mass)
    params  u16 [N,V,P]   the view parameters (pipeline.data.views), so a view replays from the store alone
    labels  i16/i32 [N]
    done    u8  [S,W]     one record per shard of rows (pipeline.store): a done flag and sha256 digests

What the KD loss gets (decode_logp / tempered_lse): at every stored tau the k + 1 buckets (top-k classes + rest)
of the tempered teacher, with the rest mass r_tau from `rest` (never 1 - a sum of rounded values: that
cancels) and the top-k normalised to 1 - r_tau; at tau 1 the largest class's probability is
1 - r_1 - (the others), so the value that matters most is not rounded at all.

Why this encoding (the budget is <= 40 bytes per stored view at K=10 on 1000 classes with tau 1, 2, 4):
- values are log-probabilities, not raw logits, in fixed point: a step of 1/181 is an absolute error of
  at most 0.28 % on every tempered probability p^(1/tau), small or large. Students close to the
  teacher (a late student) need that: their KL shrinks as the square of their distance, the error of a
  rounded target only linearly.
- the rest per tau in fixed point is an absolute error of at most 1.2e-4 in log(1 - r_tau): the
  normalisation of the top-k, the other error that does not shrink with the student's distance.
- sorting each view's top-k by class index makes `indices` increasing, so a Delta filter + zstd
  stores about one byte per index instead of two; values are permuted alongside.
- lse only gives the logits back (the audit compares it); the loss never uses it.

The zarr side (pipeline.store) creates every array with array_dtypes and the filters named here, so what
encode_* return is exactly what a read gives back.
"""

from __future__ import annotations

import numcodecs
import numpy as np
import torch

from pipeline.defaults import DEFAULT_VALUES
from pipeline.errors import UserError

REST_SCALE = 2048  # `rest` codes (encode_rest): d < 1 as its f16 bits, d >= 1 in steps of 1 / REST_SCALE
REST_ONE = int(np.float16(1.0).view(np.uint16))  # 15360: the code of d = 1 in both regimes
REST_MAX = 1 + (65535 - REST_ONE) / REST_SCALE  # 25.5: a top-k holding >= 1e-11 of the tempered mass
LSE_KEEPBITS = 10  # lse only gives the logits back (the loss never uses it): 4.9e-4 relative
RECORD = np.dtype(np.uint8)  # a done record: raw bytes


def value_scale(encoding: str) -> int | None:
    """'logp-sN' -> N (log p stored in int16 steps of 1/N, N = 16..1024); 'f16' -> None (plain f16 log p)."""
    if encoding == "f16":
        return None
    if encoding.startswith("logp-s") and encoding[6:].isdigit() and 16 <= int(encoding[6:]) <= 1024:
        return int(encoding[6:])
    raise UserError(f"value encoding '{encoding}' is not one of: logp-sN (log-probabilities in steps of 1/N, "
                    f"N = 16..1024; default {DEFAULT_VALUES}), f16 (plain f16 log-probabilities)")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32)


def array_dtypes(values: str, num_classes: int) -> dict[str, np.dtype]:
    """Each store array's dtype: what zarr holds, what a writer fills and what a read gives back."""
    index = index_dtype(num_classes)
    return {"values": np.dtype(np.float16 if value_scale(values) is None else np.float32), "indices": index,
            "lse": np.dtype(np.float32), "rest": np.dtype(np.uint16), "params": np.dtype(np.uint16),
            "labels": index, "done": RECORD}


# every dtype a store array may have (either value encoding, few or many classes): what an open accepts
STORE_DTYPES = frozenset(str(dtype) for values in ("f16", DEFAULT_VALUES) for num_classes in (1, 1 << 16)
                         for dtype in array_dtypes(values, num_classes).values())


def fixed_point(step: int) -> dict:
    """The numcodecs FixedScaleOffset configuration storing f32 values as int16 multiples of 1/step (given
    positionally: this module names no view setting)."""
    config = numcodecs.FixedScaleOffset(0, step, np.float32, np.int16).get_config()
    config.pop("id")
    return config


def check_temperatures(temperatures) -> list[float]:
    """The stored temperatures: 1 first (lse is always kept), then the others ascending, no repeats."""
    taus = sorted({float(t) for t in temperatures} | {1.0})
    if taus[0] <= 0:
        raise UserError(f"temperatures must be > 0, got {', '.join(f'{t:g}' for t in taus)} (e.g. --temperatures 1,2,4)")
    return [1.0] + [t for t in taus if t != 1.0]


def encode_rest(logits: torch.Tensor, k: int, temperatures) -> np.ndarray:
    """[B,C] logits -> u16 [B,T] codes of d_tau = logsumexp(z / tau) - logsumexp(top-k z / tau) = -log(1 - r_tau)
    (r_tau: the tempered mass off the top-k) at each stored tau, as stored (REST_SCALE steps)."""
    z = logits.double()
    top = z.topk(k, dim=1).values
    d = torch.stack([torch.logsumexp(z / tau, 1) - torch.logsumexp(top / tau, 1)
                     for tau in check_temperatures(temperatures)], 1)
    d = d.clamp(0, REST_MAX).cpu().numpy()
    small = np.minimum(d, 1.0).astype(np.float16).view(np.uint16)  # f16 rounds d near 1 up to 1.0: code REST_ONE
    large = (REST_ONE + np.round((d - 1) * REST_SCALE)).clip(REST_ONE, 65535).astype(np.uint16)
    return np.where(d < 1, small, large)


def rest_d(codes: torch.Tensor) -> torch.Tensor:
    """`rest` codes -> float64 d = -log(1 - r) (encode_rest's two regimes)."""
    codes = codes.long()
    small = torch.from_numpy(codes.clamp_max(REST_ONE).to(torch.int16).numpy().view(np.float16).astype(np.float64))
    return torch.where(codes < REST_ONE, small, 1 + (codes - REST_ONE).double() / REST_SCALE)


def encode_lse(lse: torch.Tensor) -> np.ndarray:
    """lse [B] -> f32 [B] as the store keeps it (LSE_KEEPBITS mantissa bits, zarr's BitRound filter)."""
    return numcodecs.BitRound(keepbits=LSE_KEEPBITS).encode(lse.float().cpu().numpy()).view(np.float32).copy()


def encode_topk(logits: torch.Tensor, k: int, encoding: str = DEFAULT_VALUES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B,C] logits -> (log p [B,K], classes [B,K] ascending, lse f32 [B]) as stored (callers see the rounding)."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=1)
    top, idx = z.topk(k, dim=1)
    idx, order = idx.sort(dim=1)
    logp = (top.gather(1, order) - lse[:, None]).cpu().numpy()
    step = value_scale(encoding)
    if step is None:
        logp = logp.astype(np.float16)
    else:  # what the fixed_point filter stores: int16 steps of 1/step (log p below -32767/step is clipped)
        logp = (np.rint(np.clip(logp, -32767 / step, 0) * step) / step).astype(np.float32)
    return logp, idx.cpu().numpy(), encode_lse(lse)


def value_steps(values: np.ndarray, step: int | None) -> np.ndarray:
    """Stored values -> int16 multiples of 1/step (exact: the stored values are such multiples), half the
    memory of f32; plain f16 values (step None) as they are. decode_logp takes them back divided by step."""
    if step is None:
        return values
    return (torch.from_numpy(values).double() * step).round().short().numpy()


def topk_mass(values: np.ndarray) -> np.ndarray:
    """The tau-1 probability the stored top-k hold, per view: sum(exp(stored log p))."""
    return np.exp(values.astype(np.float32)).sum(-1)


def decode_logp(values: torch.Tensor, rest1: torch.Tensor) -> torch.Tensor:
    """Stored log p [B,K] and the tau-1 rest code [B] -> float64 log p of the k buckets, summing to 1 - r_1.

    The largest class's probability is not read from its rounded value but is 1 - r_1 - (the others): at
    tau 1 it is most of the mass, where a rounded log p would cost the most (at least the others' largest).
    """
    v = values.double()
    p = v.exp()
    top = v.argmax(1, keepdim=True)
    others = p.scatter(1, top, 0.0)
    known = torch.exp(-rest_d(rest1))  # 1 - r_1
    p_top = torch.maximum(known - others.sum(1), others.max(1).values).clamp_min(1e-300)
    p = others.scatter(1, top, p_top[:, None])
    return p.log() + (known.log() - p.sum(1).log())[:, None]  # a no-op unless p_top was clamped


def tempered_lse(logp: torch.Tensor, rest_tau: torch.Tensor, tau: float) -> torch.Tensor:
    """logsumexp(log p / tau) over ALL classes, float64 [B], from the k buckets and the rest code at tau:
    the top-k hold 1 - r_tau = exp(-d_tau) of the tempered mass."""
    return torch.logsumexp(logp / tau, 1) + rest_d(rest_tau)
