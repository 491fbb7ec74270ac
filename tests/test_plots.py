"""adapterkit.plots: the figures are real files of the format their suffix names, show what they were
given, and bad input fails with a message that names the problem before anything is written."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from PIL import Image

from adapterkit.plots import accuracy_heatmap, domain_bars, pareto_front, pareto_plot

matplotlib = pytest.importorskip("matplotlib")

NAMES = ["gtsrb", "mnist", "omniglot"]
R = [[0.91], [0.91, 0.985], [0.91, 0.985, 0.0417]]
RESULTS = {
    "parallel": {"gtsrb": 0.90, "mnist": 0.98, "omniglot": 0.45},
    "series": {"gtsrb": 0.88, "mnist": 0.97, "omniglot": 0.40},
    "fine-tuning": {"gtsrb": 0.85, "mnist": 0.99, "omniglot": 0.30},
}
POINTS = {
    "adapters": [(1.66, 59.2)],
    "joint SVD": [(1.2, 50.1, "K=C/4"), (1.37, 54.9, "K=C/2"), (1.55, 55.0, "K=3C/4")],
    "incremental": [(1.3, 52.0, None, 0.8), (1.45, 55.7, "8 columns", 0.5)],
}


def assert_png(path, min_side=300):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert min_side <= width <= 4000 and min_side // 2 <= height <= 4000
        assert len(np.unique(np.asarray(image.convert("L")))) > 16  # drawn, not a blank canvas


def test_heatmap_png_and_its_cells_in_svg(tmp_path):
    png = accuracy_heatmap(R, NAMES, tmp_path / "r.png", title="accuracy matrix")
    assert png == tmp_path / "r.png"
    assert_png(png)
    svg = accuracy_heatmap(
        np.array(R[-1:]), NAMES, tmp_path / "r.svg", row_names=["family@abc123"], ylabel="run"
    )
    text = svg.read_text()
    assert ">run<" in text and ">after training<" not in text
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    # One row of three cells, percentages with one decimal, each label once.
    for label in ("91.0", "98.5", "4.2", "family@abc123", *NAMES):
        assert text.count(f">{label}<") == 1, label
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png", "r.svg"]  # no temporary left


def test_heatmap_leaves_cells_above_the_diagonal_blank(tmp_path):
    text = accuracy_heatmap(R, NAMES, tmp_path / "r.svg").read_text()
    assert ">after training<" in text and ">accuracy on<" in text
    assert text.count(">91.0<") == 3 and text.count(">98.5<") == 2 and text.count(">4.2<") == 1
    assert "nan" not in text.lower()
    nan_row = [[0.5, math.nan, 0.25]]
    text = accuracy_heatmap(nan_row, NAMES, tmp_path / "x.svg", row_names=["a"]).read_text()
    assert ">50.0<" in text and ">25.0<" in text and text.count(".0<") == 2


def test_percentages_are_drawn_as_given(tmp_path):
    text = accuracy_heatmap([[91.0], [90.0, 98.5]], NAMES[:2], tmp_path / "r.svg").read_text()
    assert ">91.0<" in text and ">98.5<" in text
    text = accuracy_heatmap([[0.5]], NAMES[:1], tmp_path / "r.svg", percent=True).read_text()
    assert ">0.5<" in text  # told they are percentages: not scaled
    with pytest.raises(ValueError, match="fractions in"):
        accuracy_heatmap([[50.0], [40.0, 90.0]], NAMES[:2], tmp_path / "p.svg", percent=False)


def test_pdf_by_suffix_and_bytes_are_reproducible(tmp_path):
    pdf = pareto_plot(POINTS, tmp_path / "p.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    a = domain_bars(RESULTS, tmp_path / "a.png").read_bytes()
    b = domain_bars(RESULTS, tmp_path / "b.png").read_bytes()
    assert a == b  # no date in the file: a figure committed under docs/img/ changes only with its data


def test_pareto_front():
    pts = [(1.6, 55.0), (1.4, 54.9), (1.5, 50.0), (1.0, 40.0), (1.0, 39.0), (1.7, 55.0)]
    assert pareto_front(pts) == [(1.0, 40.0), (1.4, 54.9), (1.6, 55.0)]
    assert pareto_front([(2.0, 1.0)]) == [(2.0, 1.0)]


def test_pareto_plot_marks_the_front(tmp_path):
    assert_png(pareto_plot(POINTS, tmp_path / "p.png", title="5 domains"))
    text = pareto_plot(POINTS, tmp_path / "p.svg").read_text()
    for label in ("K=C/4", "K=C/2", "K=3C/4", "8 columns", "Pareto front", *POINTS):
        assert f">{label}<" in text, label
    assert "total parameters (× one backbone)" in text


def test_domain_bars_with_errors(tmp_path):
    errors = {"parallel": {"gtsrb": 0.01, "mnist": 0.002, "mean": 0.004}}
    assert_png(domain_bars(RESULTS, tmp_path / "b.png", errors=errors, title="3 seeds"))
    text = domain_bars(RESULTS, tmp_path / "b.svg", mean=False).read_text()
    assert ">mean<" not in text and all(f">{n}<" in text for n in [*NAMES, *RESULTS])
    assert ">mean<" in domain_bars(RESULTS, tmp_path / "m.svg").read_text()


@pytest.mark.parametrize(
    ("matrix", "names", "match"),
    [
        ([[0.9, 0.8], [0.7]], NAMES[:2], "row 1 has 1 entries"),  # ragged
        ([[0.9], [0.9, 0.8]], NAMES, "3 names for a 2 x 2"),  # names mismatch
        ([], [], "empty"),
        ([[0.9], [0.9, math.nan]], NAMES[:2], "not finite"),
        ([[0.9], [0.9, 150.0]], NAMES[:2], "span 0.9 to 150"),
        ([[0.9], [0.9, -0.1]], NAMES[:2], "span"),
        ([[0.9], [0.9, 0.8]], ["a", "a"], "repeats"),
    ],
)
def test_heatmap_bad_input(tmp_path, matrix, names, match):
    with pytest.raises(ValueError, match=match):
        accuracy_heatmap(matrix, names, tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_rows_of_a_table_need_every_column(tmp_path):
    with pytest.raises(ValueError, match="row 1 has 2 entries for 3 names"):
        accuracy_heatmap([[0.1, 0.2, 0.3], [0.1, 0.2]], NAMES, tmp_path / "r.png", row_names=["a", "b"])
    with pytest.raises(ValueError, match="2 rows for 1 row_names"):
        accuracy_heatmap([[0.1] * 3, [0.2] * 3], NAMES, tmp_path / "r.png", row_names=["a"])
    with pytest.raises(TypeError, match="list of non-empty strings"):
        accuracy_heatmap([[0.1]], "gtsrb", tmp_path / "r.png")


@pytest.mark.parametrize("name", ["r.jpg", "r", "missing/r.png"])
def test_unwritable_paths(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf|does not exist"):
        accuracy_heatmap(R, NAMES, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("points", "match"),
    [
        ({}, "empty"),
        ({"a": []}, "no points"),
        ({"a": [(1.0,)]}, "parameters, accuracy"),
        ({"a": [(0.0, 50.0)]}, "> 0"),
        ({"a": [(1.0, math.nan)]}, "finite"),
    ],
)
def test_pareto_bad_input(tmp_path, points, match):
    with pytest.raises(ValueError, match=match):
        pareto_plot(points, tmp_path / "p.png")


def test_bars_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        domain_bars({}, tmp_path / "b.png")
    uneven = {**RESULTS, "probe": {"gtsrb": 0.5}}
    with pytest.raises(ValueError, match=r"'probe' has other domains.*missing \['mnist', 'omniglot'\]"):
        domain_bars(uneven, tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"errors names \['dtd'\]"):
        domain_bars(RESULTS, tmp_path / "b.png", errors={"series": {"dtd": 0.1}})
    with pytest.raises(ValueError, match="standard deviations"):
        domain_bars(RESULTS, tmp_path / "b.png", errors={"series": {"mnist": -0.1}})
    with pytest.raises(ValueError, match='named "mean"'):
        domain_bars({"a": {"mean": 0.5}}, tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


def test_the_global_style_is_left_alone(tmp_path):
    before = dict(matplotlib.rcParams)
    accuracy_heatmap(R, NAMES, tmp_path / "r.png")
    assert dict(matplotlib.rcParams) == before


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what Python does for a package not installed
    with pytest.raises(ImportError, match=r"pip install 'adapterkit\[plot\]'"):
        domain_bars(RESULTS, tmp_path / "b.png")
