"""``onetag replay --since -5m``: a time written as "5 minutes ago" with a minus sign, after a
space, looked like an option to argparse, which printed its usage block and ``expected one
argument``. ``-5m`` is read as ``5m`` (ago), after a space or an ``=`` alike."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, strategies as st

from server.cli import build_parser, main, parse_since, times_attached

REPO = Path(__file__).resolve().parent.parent

amounts = st.one_of(st.integers(min_value=0, max_value=9999).map(str),
                    st.integers(min_value=0, max_value=99999).map(lambda n: f"{n / 100:.2f}"))
units = st.sampled_from("smhdw")


@given(amounts, units)
def test_a_minus_sign_means_ago_as_without_it(amount: str, unit: str) -> None:
    now = 1_800_000_000.0

    def outcome(text: str) -> object:
        try:
            return parse_since(text, now)
        except argparse.ArgumentTypeError as exc:  # before 1970: out of range, both ways
            return str(exc).replace(repr(text), "T")

    assert outcome(f"-{amount}{unit}") == outcome(f"{amount}{unit}")


@given(amounts, units, st.sampled_from(["--since", "--until"]), st.booleans())
def test_the_replay_parser_takes_a_minus_time_after_a_space_or_an_equals_sign(
        amount: str, unit: str, option: str, attached: bool) -> None:
    value = f"-{amount}{unit}"
    argv = ["replay", f"{option}={value}"] if attached else ["replay", option, value]
    args = build_parser().parse_args(times_attached(argv))
    assert getattr(args, option[2:]) == value


def test_only_the_time_options_values_are_attached() -> None:
    assert times_attached(["replay", "--since", "-5m", "--until", "-1m", "--dry-run"]) == [
        "replay", "--since=-5m", "--until=-1m", "--dry-run"]
    # Not a time: left for argparse (and its error), as is anything after "--".
    assert times_attached(["replay", "--since", "--dry-run"]) == [
        "replay", "--since", "--dry-run"]
    assert times_attached(["backfill", "--site", "s", "--", "--since", "-5m"]) == [
        "backfill", "--site", "s", "--", "--since", "-5m"]
    # A minus and a digit is attached whatever follows, so parse_since names what is wrong.
    assert times_attached(["replay", "--since", "-5x"]) == ["replay", "--since=-5x"]


def _onetag(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "ONETAG_CONFIG"}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**environ, "PYTHONPATH": str(REPO)})


def test_replay_since_minus_five_minutes_runs_as_the_operator_types_it(tmp_path) -> None:
    config = tmp_path / "onetag.toml"
    config.write_text(f'[server]\ndatabase = "sqlite:///{tmp_path / "t.db"}"\n'
                      '[[sites]]\nid = "shop1"\n', encoding="utf-8")
    assert _onetag("migrate", "--config", str(config), cwd=tmp_path).returncode == 0
    spaced = _onetag("replay", "--config", str(config), "--since", "-5m", "--dry-run",
                     cwd=tmp_path)
    attached = _onetag("replay", "--config", str(config), "--since=-5m", "--dry-run",
                       cwd=tmp_path)
    plain = _onetag("replay", "--config", str(config), "--since", "5m", "--dry-run",
                    cwd=tmp_path)
    for result in (spaced, attached, plain):
        assert result.returncode == 0, result.stderr
        assert "usage:" not in result.stderr and "0 deliveries" in result.stdout, result
    # The same selection, named the same way (the instant moves with the clock: not compared).
    assert spaced.stdout.split(" created since")[0] == plain.stdout.split(" created since")[0]


def test_a_bad_minus_value_is_one_line_naming_it(capsys) -> None:
    """Not argparse's usage block and "expected one argument": the option, the value and
    the forms it takes."""
    try:
        main(["replay", "--since", "-5x", "--dry-run"])
    except SystemExit as exc:
        assert exc.code == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("onetag: --since: '-5x' is neither a relative time"), said
    assert "usage:" not in said and len(said.splitlines()) == 1, said
