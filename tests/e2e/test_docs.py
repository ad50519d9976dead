"""README.rst is valid reStructuredText and its examples exist and load."""

from __future__ import annotations

import re
from pathlib import Path

import docutils.core
import pytest

from mcproxy.routing.engine import ConfigError

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.rst").read_text()


def test_readme_renders_without_warnings():
    docutils.core.publish_string(README, writer_name="null",
                                 settings_overrides={"report_level": 2, "halt_level": 2})


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.lua")))
def test_every_example_is_documented_and_loads(example, engine):
    assert f"examples/{example}" in README
    try:
        engine.load(str(ROOT / "examples" / example))
    except ConfigError as e:  # pragma: no cover - shows the Lua error
        pytest.fail(str(e))


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"exec (\S+)", ci).group(1)
    assert command == "./scripts/test"
    assert "\n    ./scripts/test\n" in README
