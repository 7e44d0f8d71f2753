"""benchmarks/slsg_bench: fpr_true_rate, scale_sensitivity, fpr_exchangeability statistics on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slsg.contract import beta_quantile
from slsg_bench.fpr_true_rate import beta_cdf, promise_pit, summarise


def test_beta_cdf_matches_closed_forms():
    # Beta(1, n): 1 - (1 - x)^n; Beta(2, n - 1): 1 - (1 - x)^n - n x (1 - x)^(n - 1)
    for x in (0.01, 0.05, 0.3):
        assert beta_cdf(x, 1, 33) == pytest.approx(1 - (1 - x) ** 33, rel=1e-12)
        n = 60
        assert beta_cdf(x, 2, n - 1) == pytest.approx(1 - (1 - x) ** n - n * x * (1 - x) ** (n - 1), rel=1e-9)
    assert beta_cdf(0.0, 3, 4) == 0.0 and beta_cdf(1.0, 3, 4) == 1.0


def test_pit_inverts_the_promised_quantile():
    # the contract's 90 % bound of a k = 0 threshold on 33 images sits at PIT 0.9; k = 1 of 150 likewise
    assert promise_pit(beta_quantile(1, 33, 0.9), 0, 33) == pytest.approx(0.9, abs=1e-9)
    assert promise_pit(beta_quantile(2, 149, 0.5), 1, 150) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="0 <= k < n"):
        promise_pit(0.1, 5, 5)


def _rows(rates: np.ndarray, n: int = 33) -> list[dict]:
    return [{"true_rate": float(r), "expected_fpr": 1 / (n + 1), "fpr_upper_90": beta_quantile(1, n, 0.9),
             "pit": promise_pit(float(r), 0, n)} for r in rates]


def test_summary_flags_a_biased_promise_and_not_a_fair_one():
    rng = np.random.default_rng(0)
    fair = summarise(_rows(rng.beta(1, 33, size=400)))
    assert abs(fair["mean_pit_z"]) < 3
    assert fair["mean_true_rate"] == pytest.approx(1 / 34, rel=0.15)
    assert 20 <= fair["above_upper_90"] <= 60  # about one in ten
    biased = summarise(_rows(rng.beta(1, 16, size=400)))  # twice the promised rate
    assert biased["mean_pit_z"] > 5
    assert biased["mean_pit"] > fair["mean_pit"]
    assert math.isclose(biased["mean_promised"], 1 / 34)
    with pytest.raises(ValueError, match="no runs"):
        summarise([])


def test_scale_sensitivity_spread():
    from slsg_bench.scale_sensitivity import subset_spread

    spread = subset_spread([{"all": 1.0}, {"all": 0.99}, {"all": 1.0}, {"all": 0.97}])
    assert spread == {"mean": pytest.approx(0.99), "min": 0.97, "share_perfect": 0.5}
    with pytest.raises(ValueError, match="no resamples"):
        subset_spread([])


def test_percentiles_among_reference_scores():
    from slsg_bench.fpr_exchangeability import percentiles

    ref = np.array([0.3, 0.1, 0.2, 0.4])
    assert percentiles(np.array([0.05, 0.2, 0.25, 0.5]), ref).tolist() == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="no reference"):
        percentiles(np.array([0.1]), np.array([]))


def test_fpr_promise_rescores_an_older_report_against_the_predictive_bound():
    from slsg_bench.fpr_promise import HEADER, row, with_predictive_bound

    # cable seed 6's report as `slsg evaluate` wrote it before the count bound existed: 16 of 200 flagged
    older = {"good_images": 200, "flagged": 16, "observed_fpr": 0.08, "expected_fpr": 1 / 34, "fpr_upper_90": 0.0674,
             "threshold_images": 33, "scale_images": 17, "within_upper_90": False, "p_value_more": 0.08}
    scored = with_predictive_bound(older)
    assert (scored["flagged_upper_90"], scored["within_flagged_upper_90"]) == (14, False)
    assert with_predictive_bound({**older, "flagged": 14})["within_flagged_upper_90"]
    line = row("cable", 6, older)
    assert line.count("|") == HEADER.splitlines()[0].count("|") and "| 14 / 200 | no |" in line
