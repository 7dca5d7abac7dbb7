"""(epsilon, delta) accounting for DP-SGD with Poisson sampling, on Opacus's accountants.

The privacy unit is one training record of a site (a compound, a protein chain, an ICU stay); a step samples every
record independently with probability ``sample_rate`` (Poisson sampling, as the accountants assume) and adds
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to the sum of per-record gradients
clipped to ``max_grad_norm``.

The default accountant is RDP (Mironov 2017; Opacus ``RDPAccountant``): an upper bound on epsilon, the
accountant the DP-SGD literature reports, and one that ``dp-accounting`` (Google) computes independently, which a
test checks. ``prv`` (Gopi et al. 2021, Opacus's own default) gives a tighter epsilon for the same noise.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

from pharmafl.core.errors import InputError

ACCOUNTANTS = ("rdp", "prv")


def _accountant(name: str):
    if name not in ACCOUNTANTS:
        raise InputError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}.")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def check_mechanism(noise_multiplier: float, sample_rate: float, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise InputError(f"the noise multiplier must be a positive number, got {noise_multiplier}.")
    if not 0 < sample_rate <= 1:
        raise InputError(f"the sample rate must be in (0, 1], got {sample_rate}.")
    if not 0 < delta < 1:
        raise InputError(f"delta must be in (0, 1), got {delta}.")


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one step at its default orders (RDP composes by adding, so n steps are n times this)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent after ``steps`` Poisson-sampled Gaussian steps (0 for no step)."""
    check_mechanism(noise_multiplier, sample_rate, delta)
    if steps <= 0:
        return 0.0
    if accountant == "rdp":  # what RDPAccountant.get_epsilon computes, from the cached one-step RDP
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = _rdp_of_one_step(float(noise_multiplier), float(sample_rate)) * int(steps)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
            warnings.simplefilter("ignore")
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # PRV warns about its own grid for extreme epsilons
        warnings.simplefilter("ignore")
        try:
            return float(acc.get_epsilon(delta=delta))
        except (ValueError, OverflowError, RuntimeError):  # PRV cannot represent the loss distribution
            return math.inf


def noise_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to 0.01 of epsilon) whose ``steps`` steps spend at most ``target_epsilon``."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise InputError(f"the target epsilon must be a positive number, got {target_epsilon}.")
    if steps <= 0:
        raise InputError(f"calibrating the noise needs a positive number of steps, got {steps}.")
    from opacus.accountants.utils import get_noise_multiplier

    check_mechanism(1.0, sample_rate, delta)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )


def steps_within(
    target_epsilon: float, noise_multiplier: float, sample_rate: float, delta: float, accountant: str = "rdp"
) -> int:
    """How many steps fit in the budget: the largest n with epsilon(n) <= target_epsilon (binary search)."""
    if epsilon(noise_multiplier, sample_rate, 1, delta, accountant) > target_epsilon:
        return 0
    low, high = 1, 2
    while epsilon(noise_multiplier, sample_rate, high, delta, accountant) <= target_epsilon:
        low, high = high, high * 2
        if high > 10**9:
            return high
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon(noise_multiplier, sample_rate, middle, delta, accountant) <= target_epsilon:
            low = middle
        else:
            high = middle
    return low


def noise_guarantee(
    noise_std: float,
    steps: int,
    sample_rate: float,
    delta: float,
    max_grad_norm: float | None = None,
    accountant: str = "rdp",
) -> dict:
    """What Gaussian gradient noise of ``noise_std`` guarantees over ``steps`` steps.

    Without clipping (``max_grad_norm`` None) one record's gradient is unbounded, so no amount of noise bounds its
    influence: epsilon is infinite. With clipping to C the noise multiplier is ``noise_std / C`` (noise added to the
    sum of clipped gradients; for noise added to a mean of B gradients, pass ``noise_std * B``).
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise InputError(f"the noise standard deviation must be a number >= 0, got {noise_std}.")
    out = {
        "noise_std": noise_std,
        "steps": steps,
        "sample_rate": sample_rate,
        "delta": delta,
        "accountant": accountant,
        "max_grad_norm": max_grad_norm,
    }
    if max_grad_norm is None:
        return {
            **out,
            "epsilon": math.inf,
            "why": "without per-record clipping one record can move the gradient arbitrarily far, so the noise "
            "bounds nothing: no finite epsilon holds",
        }
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise InputError(f"the clipping norm must be a positive number, got {max_grad_norm}.")
    if noise_std == 0:
        return {**out, "noise_multiplier": 0.0, "epsilon": math.inf, "why": "no noise"}
    multiplier = noise_std / max_grad_norm
    return {
        **out,
        "noise_multiplier": multiplier,
        "epsilon": epsilon(multiplier, sample_rate, steps, delta, accountant),
    }
