"""Continual-learning metrics: accuracy matrix, ACC, BWT, forgetting, Decathlon score."""

import math

import numpy as np
import pytest
import torch

from adapterkit.metrics import (
    ContinualReport,
    accuracy_matrix,
    average_accuracy,
    backward_transfer,
    decathlon_score,
    forgetting,
    format_matrix,
)

# Columns never change after their domain is trained: what adapterkit's invariant guarantees.
FROZEN = [[0.913], [0.913, 0.377], [0.913, 0.377, 0.6612]]
# Domain 0 peaks after step 1, then drops; domain 1 drops after step 2.
DRIFTING = [[0.9], [0.95, 0.7], [0.8, 0.6, 0.5]]


def test_accuracy_matrix_pads_ragged_rows_with_nan():
    m = accuracy_matrix(FROZEN)
    assert m.shape == (3, 3) and m.dtype == np.float64
    assert math.isnan(m[0, 1]) and math.isnan(m[1, 2]) and m[2, 2] == 0.6612
    np.testing.assert_array_equal(
        accuracy_matrix(torch.tensor([[1.0, 0.125], [0.5, 0.25]])), [[1, 0.125], [0.5, 0.25]]
    )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "empty"),
        ([[0.9, 0.1, 0.2], [0.8, 0.7]], "row 0 has 3 entries"),
        ([[0.9], [0.8]], "row 1 has 1 entries"),
        ([[0.9], [float("nan"), 0.7]], r"R\[1\]\[0\]"),
    ],
)
def test_accuracy_matrix_validates(rows, match):
    with pytest.raises(ValueError, match=match):
        accuracy_matrix(rows)


def test_average_accuracy():
    assert average_accuracy(FROZEN) == pytest.approx((0.913 + 0.377 + 0.6612) / 3)
    assert average_accuracy(DRIFTING) == pytest.approx(1.9 / 3)


def test_bwt_is_exactly_zero_when_columns_do_not_change():
    assert backward_transfer(FROZEN) == 0.0
    assert forgetting(FROZEN) == 0.0


def test_bwt_and_forgetting_on_a_drifting_matrix():
    # BWT: ((0.8 - 0.9) + (0.6 - 0.7)) / 2; forgetting uses the best earlier value (0.95), not the diagonal.
    assert backward_transfer(DRIFTING) == pytest.approx(-0.1)
    assert forgetting(DRIFTING) == pytest.approx(((0.95 - 0.8) + (0.7 - 0.6)) / 2)
    improving = [[0.5], [0.6, 0.7]]
    assert backward_transfer(improving) == pytest.approx(0.1)
    assert forgetting(improving) == pytest.approx(-0.1)


def test_single_domain_has_no_transfer():
    assert backward_transfer([[0.8]]) == 0.0 and forgetting([[0.8]]) == 0.0
    assert average_accuracy([[0.8]]) == 0.8


def test_decathlon_score_anchors():
    base = {"at_baseline": 0.2, "perfect": 0.3, "twice": 0.1, "worse": 0.1, "half": 0.4}
    errors = {"at_baseline": 0.2, "perfect": 0.0, "twice": 0.2, "worse": 0.35, "half": 0.2}
    total, per = decathlon_score(errors, base)
    assert per["half"] == pytest.approx(562.5)  # 1000 * (1 - 0.2 / 0.8) ** 2
    assert {k: v for k, v in per.items() if k != "half"} == {
        "at_baseline": 250.0,
        "perfect": 1000.0,
        "twice": 0.0,
        "worse": 0.0,
    }
    assert total == pytest.approx(1812.5)


def test_decathlon_ignores_extra_baselines():
    total, per = decathlon_score({"a": 0.1}, {"a": 0.1, "b": 0.5})
    assert total == 250.0 and list(per) == ["a"]


@pytest.mark.parametrize(
    "errors, base, match",
    [
        ({"a": 0.1}, {"b": 0.1}, "no baseline error for domain 'a'"),
        ({"a": 0.1}, {"a": 0.0}, "baseline error of 'a' is 0"),
        ({"a": 12.0}, {"a": 0.1}, "fraction in"),
        ({"a": float("nan")}, {"a": 0.1}, "fraction in"),
        ({"a": 0.1}, {"a": -0.1}, "fraction in"),
        ({}, {"a": 0.1}, "empty"),
    ],
)
def test_decathlon_validates(errors, base, match):
    with pytest.raises(ValueError, match=match):
        decathlon_score(errors, base)


def test_format_matrix_and_report():
    text = format_matrix(DRIFTING, ["omniglot", "gtsrb", "mnist"])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1].split() == ["omniglot", "0.90", "-", "-"]
    assert "0.95" in lines[2] and lines[3].endswith("0.50")
    with pytest.raises(ValueError, match="one per domain"):
        format_matrix(DRIFTING, ["a"])
    rep = ContinualReport.from_matrix(DRIFTING, ["omniglot", "gtsrb", "mnist"])
    assert rep.acc == pytest.approx(1.9 / 3) and rep.bwt == pytest.approx(-0.1)
    assert "BWT -0.1000" in str(rep) and "omniglot" in str(rep)
