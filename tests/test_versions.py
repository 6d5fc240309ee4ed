"""The installed transformers is one requirements.txt allows (issue 10 item 2).

.ci/lowest runs this file with the model, sampler and memory tests under the LOWEST allowed
version and sets ANTISD_EXPECT_TRANSFORMERS to it, so that run cannot silently test the system's
newer transformers instead.
"""

import os
import re

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(v: str) -> tuple[int, ...]:
    """"5.17" and "5.17.0" -> (5, 17); "5.24.0.dev0" -> (5, 24)."""
    parts = [int(x) for x in re.match(r"[0-9]+(?:\.[0-9]+)*", v).group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def transformers_range() -> tuple[str, str]:
    """(lowest allowed, first excluded) from requirements.txt's `transformers>=A,<B` line."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"\s*transformers\s*>=\s*([0-9.]+)\s*,\s*<\s*([0-9.]+)", line)
            if m:
                return m.group(1), m.group(2)
    raise AssertionError("requirements.txt: no 'transformers>=A,<B' line")


def test_installed_transformers_is_in_the_allowed_range():
    low, high = transformers_range()
    have = transformers.__version__
    assert _version(low) <= _version(have) < _version(high), f"transformers {have} is outside requirements.txt's >={low},<{high}"


def test_the_lowest_version_run_really_runs_the_lowest_version():
    want = os.environ.get("ANTISD_EXPECT_TRANSFORMERS")
    if want is None:
        return  # the main suite: any allowed version
    assert want == transformers_range()[0], f"ANTISD_EXPECT_TRANSFORMERS={want} is not requirements.txt's lower bound"
    assert _version(transformers.__version__) == _version(want), f"the lowest-version run imported transformers {transformers.__version__} from {transformers.__file__}"
