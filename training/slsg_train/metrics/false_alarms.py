"""The false-alarm rate observed on normal test images beside the one the calibration promised.

The promise (``slsg.contract.Calibration``): with k of n threshold images at or above the threshold,
a new normal image reaches it with probability p ~ Beta(k + 1, n - k); on average (k + 1) / (n + 1),
under the Beta's 90 % quantile for nine calibration sets in ten. Of m normal test images, the number
flagged is then Beta-binomial(m, k + 1, n - k): the binomial count of the test images with the rate
itself drawn as the promise says. Its upper tail at the observed count is the chance of seeing that
many false alarms or more if the promise holds; below ``SIGNIFICANCE`` the excess is beyond chance.

What a line can hold the promise to is that count: its 90 % quantile (:func:`flagged_upper`) is the
number of the m good images it expects at most to be flagged in nine evaluations in ten, both
sources of chance included (which normal images calibrated, and which m it is evaluated on). The
promised 90 % bound on the *rate* (``fpr_upper_90``) leaves out the second: an observed rate of m
images exceeds it more often than one time in ten even when the promise is exact.
The plain binomial tail at the promised average rate is reported as well: it asks whether *this*
model's rate is above average, which a fair promise allows in half of all calibrations.
"""

from __future__ import annotations

import math
from typing import Any

from slsg.contract import Calibration, calibration_exceedances

SIGNIFICANCE = 0.05


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def binomial_tail(flagged: int, images: int, rate: float, upper: bool = True) -> float:
    """P(X >= flagged) (``upper``) or P(X <= flagged) for X ~ Binomial(images, rate)."""
    _check_counts(flagged, images)
    if not 0 <= rate <= 1:
        raise ValueError(f"a rate must be in [0, 1], got {rate}")
    xs = range(flagged, images + 1) if upper else range(0, flagged + 1)
    if rate in (0.0, 1.0):
        return float(any((x == 0) if rate == 0 else (x == images) for x in xs))
    log_p, log_q = math.log(rate), math.log1p(-rate)
    return min(1.0, sum(math.exp(_log_choose(images, x) + x * log_p + (images - x) * log_q) for x in xs))


def beta_binomial_tail(flagged: int, images: int, a: int, b: int, upper: bool = True) -> float:
    """P(X >= flagged) (``upper``) or P(X <= flagged) for X ~ Beta-binomial(images, a, b)."""
    _check_counts(flagged, images)
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta-binomial parameters must be positive, got a={a}, b={b}")
    xs = range(flagged, images + 1) if upper else range(0, flagged + 1)
    log_norm = _log_beta(a, b)
    return min(1.0, sum(math.exp(_log_choose(images, x) + _log_beta(x + a, images - x + b) - log_norm) for x in xs))


def flagged_upper(images: int, a: int, b: int, probability: float = 0.9) -> int:
    """The smallest x with P(X <= x) >= ``probability`` for X ~ Beta-binomial(images, a, b): at most
    this many of ``images`` normal images are flagged with that probability."""
    if images < 0:
        raise ValueError(f"the number of images must be >= 0, got {images}")
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta-binomial parameters must be positive, got a={a}, b={b}")
    log_norm, cdf = _log_beta(a, b), 0.0
    for x in range(images + 1):
        cdf += math.exp(_log_choose(images, x) + _log_beta(x + a, images - x + b) - log_norm)
        if cdf >= probability - 1e-12:  # the rounding of a sum of terms must not skip a quantile it reaches
            return x
    return images


def _check_counts(flagged: int, images: int) -> None:
    if images < 0 or not 0 <= flagged <= images:
        raise ValueError(f"need 0 <= flagged <= images, got {flagged} flagged of {images}")


def false_alarm_report(flagged: int, images: int, cal: Calibration, has_checks: bool = True) -> dict[str, Any]:
    """Observed vs promised false-alarm rate on ``images`` normal test images, ``flagged`` of them at or
    above the threshold; ``verdict`` says whether the difference is beyond chance (see the module
    docstring). ``flagged_upper_90`` is the count a line can hold the promise to: at most that many of
    these ``images`` flagged in nine evaluations in ten (``within_flagged_upper_90``: whether this one
    was). ``promise_by_construction`` is False where a model's reference checks (``has_checks``)
    were scaled on the threshold's own images (calibrations from before the split): that promise is
    known to be optimistic."""
    report: dict[str, Any] = {"good_images": images, "flagged": flagged,
                              "observed_fpr": flagged / images if images else None,
                              "expected_fpr": cal.expected_fpr(), "fpr_upper_90": cal.fpr_upper(0.9),
                              "threshold_images": cal.num_images, "scale_images": cal.scale_images,
                              "target_fpr": cal.target_fpr,
                              "promise_by_construction": cal.scale_images is not None or not has_checks}
    if images == 0 or cal.num_images <= 0:
        return {**report, "verdict": "no normal test images" if images == 0 else "not calibrated"}
    n = cal.num_images
    k = calibration_exceedances(cal.target_fpr, n)
    p_more = beta_binomial_tail(flagged, images, k + 1, n - k, upper=True)
    p_fewer = beta_binomial_tail(flagged, images, k + 1, n - k, upper=False)
    upper_count = flagged_upper(images, k + 1, n - k, 0.9)
    report.update(p_value_more=p_more, p_value_fewer=p_fewer, flagged_upper_90=upper_count,
                  within_flagged_upper_90=flagged <= upper_count,
                  binomial_p_value_at_expected=binomial_tail(flagged, images, report["expected_fpr"], upper=True),
                  within_upper_90=report["observed_fpr"] <= report["fpr_upper_90"],
                  beyond_chance=p_more < SIGNIFICANCE)
    if p_more < SIGNIFICANCE:
        verdict = f"more false alarms than promised, beyond chance (p = {p_more:.3g})"
    elif p_fewer < SIGNIFICANCE:
        verdict = f"fewer false alarms than promised, beyond chance (p = {p_fewer:.3g}): the promise is cautious"
    else:
        verdict = f"within chance of the promise (p = {p_more:.3g} for this many or more)"
    return {**report, "verdict": verdict}


def render_false_alarms_md(report: dict[str, Any]) -> list[str]:
    """Markdown lines for report.md."""
    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.2f} %"

    lines = ["## False alarms on normal test images", "",
             f"- observed: {report['flagged']} of {report['good_images']} good test images flagged "
             f"({pct(report['observed_fpr'])})",
             f"- promised: {pct(report['expected_fpr'])} on average, under {pct(report['fpr_upper_90'])} for nine "
             f"calibration sets in ten ({report['threshold_images']} threshold images)",
             f"- verdict: {report['verdict']}"]
    if "flagged_upper_90" in report:
        within = "within it" if report["within_flagged_upper_90"] else "beyond it"
        lines.insert(-1, f"- expect at most {report['flagged_upper_90']} of {report['good_images']} flagged in nine "
                         f"evaluations in ten (which images calibrated and which were evaluated both counted); "
                         f"observed {report['flagged']}, {within}")
    if "binomial_p_value_at_expected" in report:
        lines.append(f"- binomial test at the average rate alone: p = {report['binomial_p_value_at_expected']:.3g}")
    if not report["promise_by_construction"]:
        lines.append("- this calibration fitted the checks' scales on its own threshold images (made before the "
                     "split): its promise is optimistic; `slsg calibrate` renews it")
    return lines
