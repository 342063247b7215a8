"""Paired comparisons: the two-way bootstrap against known answers and simulation, the variance components and the
minimal detectable effect against their formulas."""
import math

import numpy as np
import pytest

from loran.pipeline.paired import MDE_FACTOR, changed_predictions, compare, components, difference_matrix, holm, \
    planned_se, scores_by_seed


def as_runs(matrix, ids=None):
    ids = ids or [f"x{i}" for i in range(matrix.shape[1])]
    return {s: dict(zip(ids, map(float, row))) for s, row in enumerate(matrix)}


def crossed(rng, seeds, examples, delta, sd_seed, sd_example, sd_resid):
    """d[s, i] = delta + seed effect + example effect + noise."""
    return (delta + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_example, (1, examples))
            + rng.normal(0, sd_resid, (seeds, examples)))


def test_a_constant_difference_is_found_exactly():
    b = np.random.default_rng(0).integers(0, 2, (3, 50)).astype(float)
    result = compare(as_runs(b + 0.1), as_runs(b), n_boot=200)
    assert result.delta == pytest.approx(0.1) and result.ci_low == pytest.approx(0.1) and result.ci_high == pytest.approx(0.1)
    assert result.se == pytest.approx(0, abs=1e-12) and result.discordant == 1.0 and result.significant


def test_only_shared_seeds_and_examples_are_paired():
    a = {0: {"u": 1.0, "v": 0.0, "w": 1.0}, 1: {"u": 1.0, "v": 1.0}, 5: {"u": 0.0}}
    b = {0: {"u": 0.0, "v": 0.0, "z": 1.0}, 1: {"u": 1.0, "v": 0.0}}
    d, seeds, ids = difference_matrix(a, b)
    assert seeds == [0, 1] and ids == ["u", "v"] and d.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="share no seed"):
        difference_matrix({0: {"u": 1.0}}, {1: {"u": 1.0}})
    with pytest.raises(ValueError, match="share no evaluated example"):
        difference_matrix({0: {"u": 1.0}}, {0: {"v": 1.0}})


def test_variance_components_are_recovered():
    rng = np.random.default_rng(1)
    parts = components(crossed(rng, 200, 400, 0.0, 0.03, 0.2, 0.1))
    assert parts["seed"] == pytest.approx(0.03**2, rel=0.25)
    assert parts["example"] == pytest.approx(0.2**2, rel=0.15)
    assert parts["residual"] == pytest.approx(0.1**2, rel=0.05)


def test_bootstrap_se_matches_the_planned_se_and_the_interval_covers_the_truth():
    """100 simulated studies (5 seeds x 300 examples): the 95 % interval covers the true effect in 88-100 of them,
    and the bootstrap SE is within 10 % of what planned_se predicts from the true components (the bootstrap's own
    variance: residual counted about 3 times, seed 4/5 times)."""
    rng = np.random.default_rng(2)
    truth = {"seed": 0.03**2, "example": 0.15**2, "residual": 0.2**2}
    covered, ratios = 0, []
    for _ in range(100):
        d = crossed(rng, 5, 300, 0.02, 0.03, 0.15, 0.2)
        result = compare(as_runs(d + 0.5), as_runs(np.full_like(d, 0.5)), n_boot=300, seed=int(rng.integers(1e9)))
        covered += result.ci_low <= 0.02 <= result.ci_high
        ratios.append(result.se / planned_se(truth, 5, 300))
        assert result.mde == pytest.approx(MDE_FACTOR * result.se)
    assert 88 <= covered <= 100
    assert 0.9 < float(np.median(ratios)) < 1.1


@pytest.mark.parametrize("parts, se", [   # S = 4 seeds, N = 100 examples
    ({"seed": 0.04, "example": 0.0, "residual": 0.0}, math.sqrt(3 / 16 * 0.04)),          # (S-1)/S^2 v_seed
    ({"seed": 0.0, "example": 0.09, "residual": 0.0}, math.sqrt(99 / 100**2 * 0.09)),     # (N-1)/N^2 v_example
    ({"seed": 0.0, "example": 0.0, "residual": 0.16},                                     # three residual terms
     math.sqrt(3 / 16 * 0.16 / 100 + 99 / 100**2 * 0.16 / 4 + 3 * 99 / 400**2 * 0.16)),   # 3.0e-4 + 3.96e-4 + 2.97e-4
    ({"seed": 0.04, "example": 0.09, "residual": 0.16}, math.sqrt(0.0075 + 0.000891 + 0.000993)),
])
def test_the_planned_se_is_the_pigeonhole_bootstrap_s_expected_variance(parts, se):
    assert planned_se(parts, 4, 100) == pytest.approx(se, rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 3), (3, 3), (3, 4)])
def test_the_planned_se_of_a_matrix_s_components_is_its_bootstrap_variance_over_every_resample(shape):
    """Every resample of seeds and examples (S^S x N^N of them, equally likely) enumerated: the variance of their
    means is planned_se(components(d))^2 to rounding, for a matrix with seed and example effects (nothing clipped)."""
    import itertools

    n_s, n_i = shape
    d = np.random.default_rng(n_s * 10 + n_i).normal(size=shape) + 3 * np.arange(n_s)[:, None] + 2 * np.arange(n_i)
    parts = components(d)
    assert min(parts.values()) > 0
    means = [d[list(rows)][:, list(cols)].mean() for rows in itertools.product(range(n_s), repeat=n_s)
             for cols in itertools.product(range(n_i), repeat=n_i)]
    assert len(means) == n_s**n_s * n_i**n_i
    assert planned_se(parts, n_s, n_i) ** 2 == pytest.approx(np.var(means), rel=1e-9)


def test_components_of_two_seeds_with_a_seed_effect_and_no_residual_are_the_anova_s():
    """d = seed effect + example effect, 2 seeds (the validation grid's case): residual 0, seed component
    (b - a)^2 / 2, example component the examples' sample variance."""
    ex = np.linspace(0.0, 0.5, 11)
    parts = components(np.array([0.1 + ex, -0.1 + ex]))
    assert parts["residual"] == pytest.approx(0.0, abs=1e-15)
    assert parts["seed"] == pytest.approx(0.2**2 / 2) and parts["example"] == pytest.approx(ex.var(ddof=1))


def test_components_of_a_single_example_warn_nothing_and_give_no_example_variance():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a variance over one example (ddof 1) would warn: it must not be taken
        parts = components(np.array([[0.1], [0.3]]))
    assert parts == pytest.approx({"seed": 0.01, "example": 0.0, "residual": 0.01})


def test_records_give_scores_by_seed_and_changed_predictions():
    def record(seed, preds):
        return {"cell": f"c{seed}", "choices": {"seed": seed},
                "predictions": [{"id": i, "prediction": p, "accuracy": float(p == "a")} for i, p in preds.items()]}

    a = [record(0, {"x": "a", "y": "b"}), record(1, {"x": "a", "y": "a"})]
    b = [record(0, {"x": "a", "y": "a"}), record(1, {"x": "b", "y": "a"})]
    assert scores_by_seed(a, "accuracy") == {0: {"x": 1.0, "y": 0.0}, 1: {"x": 1.0, "y": 1.0}}
    assert changed_predictions(a, b) == 0.5
    with pytest.raises(ValueError, match=r"^no \(seed, example\) pair in common$"):
        changed_predictions(a, [record(2, {"x": "a"})])
    with pytest.raises(ValueError, match="two records for seed 0"):
        scores_by_seed([a[0], a[0]], "accuracy")
    with pytest.raises(ValueError, match="kept no per-example predictions"):
        scores_by_seed([{"cell": "old", "choices": {"seed": 0}}], "accuracy")


def test_holm_adjusts_by_rank_keeps_order_and_stays_monotone():
    """Against Holm's procedure worked by hand: sorted p = .01, .02, .03, .04 over m = 4 -> .04, .06, .06 (monotone:
    .03 x 2 = .06 < .06), .06 (.04 x 1 = .04 raised to .06); given order kept; capped at 1."""
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == [] and holm([0.2]) == [0.2]
    assert holm([0.6, 0.7]) == [1.0, 1.0]   # 2 x 0.6 = 1.2: capped at 1
    p = np.random.default_rng(4).uniform(size=12)
    adjusted = holm(list(p))
    assert all(a >= q for a, q in zip(adjusted, p))
    order = np.argsort(p)
    assert all(adjusted[i] <= adjusted[j] for i, j in zip(order, order[1:]))


def test_the_bootstrap_p_value_agrees_with_the_interval_and_is_uniform_under_the_null():
    """p < 0.05 exactly when the 95 % interval excludes 0 (a clear effect: p at its floor 2 / (B + 1)); under no
    effect, p is below 0.05 in at most about 5 % of 200 simulated studies (3 here: the crossed bootstrap is a
    little conservative with 5 seeds, as its interval's coverage above), and not never."""
    rng = np.random.default_rng(5)
    clear = compare(as_runs(crossed(rng, 5, 300, 0.2, 0.01, 0.1, 0.1) + 0.5), as_runs(np.full((5, 300), 0.5)),
                    n_boot=499)
    assert clear.p_value == pytest.approx(2 / 500) and clear.significant
    rejected = 0
    for k in range(200):
        d = crossed(rng, 5, 200, 0.0, 0.02, 0.1, 0.2)
        result = compare(as_runs(d + 0.5), as_runs(np.full_like(d, 0.5)), n_boot=199, seed=k)
        assert (result.p_value < 0.05) <= result.significant  # the +1 makes p a little conservative
        rejected += result.p_value < 0.05
    assert 1 <= rejected <= 14
