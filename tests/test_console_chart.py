"""The server-drawn SVG chart: well-formed, scalable (viewBox, no fixed size), labels
escaped, gaps kept as gaps, axes from the data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, strategies as st

from server.admin.chart import HEIGHT, TOP, WIDTH, Series, line_chart, nice_max

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on markup that is not well-formed


def test_a_chart_scales_from_its_viewbox_and_names_itself() -> None:
    root = parse(line_chart([Series("p50", [10, 20, 30])], ["00", "01", "02"],
                            title="sendlane latency", unit=" ms"))
    assert root.get("viewBox") == f"0 0 {WIDTH} {HEIGHT}"
    assert root.get("width") is None and root.get("height") is None
    assert root.find(f"{SVG}title").text == "sendlane latency"
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "50 ms" in labels and "0 ms" in labels and "25 ms" in labels  # axis: 0, half, nice top
    assert {"00", "01", "02", "p50"} <= set(labels)


def test_every_text_is_escaped() -> None:
    hostile = '<script>alert("x")</script>&'
    svg = line_chart([Series(hostile, [1, 2])], [hostile, "b"], title=hostile, unit="&")
    assert "<script>" not in svg
    root = parse(svg)
    assert root.find(f"{SVG}title").text == hostile
    assert hostile in [t.text for t in root.iter(f"{SVG}text")]


def test_a_missing_value_breaks_the_line_and_a_lone_value_is_a_dot() -> None:
    root = parse(line_chart([Series("rate", [50, 60, None, 70, 80, None, 90])],
                            [str(i) for i in range(7)], title="t", y_max=100, unit="%"))
    lines = root.findall(f"{SVG}polyline")
    assert [len(p.get("points").split()) for p in lines] == [2, 2]
    assert len(root.findall(f"{SVG}circle")) == 1
    # y_max fixes the top: 100 % is at the top of the plot.
    top_label = [t for t in root.iter(f"{SVG}text") if t.text == "100%"]
    assert top_label and float(top_label[0].get("y")) == pytest.approx(TOP + 3)


def test_no_data_says_so() -> None:
    svg = line_chart([Series("p50", [None, None])], ["a", "b"], title="t")
    assert "no attempts" in svg and "<polyline" not in svg
    parse(svg)


def test_series_and_labels_must_agree() -> None:
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        line_chart([Series("p50", [1, 2, 3])], ["a", "b"], title="t")


@given(st.floats(min_value=1e-6, max_value=1e9, allow_nan=False))
def test_the_axis_top_is_a_round_number_at_or_above_the_data(value: float) -> None:
    top = nice_max(value)
    assert value <= top <= 2.5 * value + 1e-9
    mantissa = top / 10 ** int(f"{top:e}".split("e")[1])
    assert round(mantissa, 6) in (1, 2, 5, 10)


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)), min_size=1,
                max_size=40))
def test_any_series_draws_inside_the_view(values) -> None:
    root = parse(line_chart([Series("s", values)], [str(i) for i in range(len(values))],
                            title="t"))
    for line in root.findall(f"{SVG}polyline"):
        for point in line.get("points").split():
            x, y = map(float, point.split(","))
            assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT
