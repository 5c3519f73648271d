"""``pneumodet COMMAND --help`` as a user reads it: every option with a default says it; no option twice."""

from __future__ import annotations

import argparse
import re

import pytest

from pneumodet.cli import COMMANDS, _HelpFormatter, build_parser, main

NAMES = [name for name, *_ in COMMANDS]


def _help(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _option_help(text: str, invocation: str) -> str:
    """The help text of the option shown as ``invocation`` (e.g. ``--seed SEED``), its wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+{re.escape(invocation)}(\s|$)", line))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.strip() or re.match(r"\s{0,4}-", line) or not line.startswith(" "):
            break  # the next option, a blank line or a section title
        block.append(line)
    return " ".join(" ".join(block).split())


def _has_default(action: argparse.Action) -> bool:
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, list | tuple | str) and not default))


@pytest.mark.parametrize("name", NAMES)
def test_every_option_with_a_default_shows_it_in_help(name: str, capsys) -> None:
    text = _help(name, capsys)
    parser = argparse.ArgumentParser(prog=f"pneumodet {name}", formatter_class=_HelpFormatter)
    next(add for n, _, add, _ in COMMANDS if n == name)(parser)
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        if not action.option_strings or not _has_default(action) or isinstance(action, argparse._HelpAction):
            continue
        shown = _option_help(text, formatter._format_action_invocation(action))
        assert "default" in shown.lower(), f"{name} {action.option_strings[-1]}: no default in {shown!r}"
        checked += 1
    # options that are not set by default say so in words where it matters; those with a value show it
    assert checked or name in ("compare", "score", "export", "pacs", "predict", "evaluate", "train", "grid", "cv")


def test_a_default_the_help_did_not_state_is_added_with_its_value(capsys) -> None:
    text = _help("synth", capsys)
    assert "(default: 0)" in _option_help(text, "--seed SEED")  # "random seed; same seed, same files"


def test_grid_offers_one_augmentation_option(capsys) -> None:
    """``grid`` took ``--aug`` (train's single level, silently replaced by each run's level) beside ``--augs``."""
    text = _help("grid", capsys)
    assert "--augs AUGS" in text and not re.search(r"--aug\b(?!s)", text)
    assert "heavy_with_rotations" in _option_help(text, "--augs AUGS")
    # before, `grid --aug light` set train's option, which each run's level (--augs, default heavy) replaced:
    # the grid trained heavy; now it is argparse's abbreviation of --augs and the grid trains light
    assert build_parser().parse_args(["grid", "--aug", "light", "--out", "x"]).augs == "light"


@pytest.mark.parametrize("name", NAMES)
def test_no_option_is_offered_twice(name: str) -> None:
    parser = argparse.ArgumentParser(prog=f"pneumodet {name}")
    next(add for n, _, add, _ in COMMANDS if n == name)(parser)  # argparse raises on a duplicate string
    dests = [a.dest for a in parser._actions if a.option_strings]
    assert len(dests) == len(set(dests)), sorted(d for d in dests if dests.count(d) > 1)
