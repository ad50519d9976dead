"""README.rst is valid reStructuredText and its examples exist and load."""

from __future__ import annotations

import re
from pathlib import Path

import docutils.core
import pytest

from mcproxy.routing.engine import ROUTELIB_PATH, ConfigError

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.rst").read_text()


def test_readme_renders_without_warnings():
    docutils.core.publish_string(README, writer_name="null",
                                 settings_overrides={"report_level": 2, "halt_level": 2})


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.lua")))
def test_every_example_is_documented_and_loads(example, engine):
    """Each example loads as what it is: a route config, or (routelib*.lua)
    a file for the route library (--config=routelib --config-arg=FILE)."""
    assert f"examples/{example}" in README
    path = str(ROOT / "examples" / example)
    try:
        if example.startswith("routelib"):
            engine.load(ROUTELIB_PATH, path)
        else:
            engine.load(path)
    except ConfigError as e:  # pragma: no cover - shows the Lua error
        pytest.fail(str(e))


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"exec (\S+)", ci).group(1)
    assert command == "./scripts/test"
    assert "\n    ./scripts/test\n" in README
