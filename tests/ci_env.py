# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the tests run, and how a test gives up on a missing prerequisite.

A plain module (tests/ is on sys.path under pytest): tests and fixture modules import these
names from here, never from conftest.
"""

import os

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def in_ci():
    """True when running under CI (``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require_or_skip(reason):
    """Give up on the current test because something it needs is missing.

    Outside CI the test is skipped; with ``CI=true`` it fails, so a CI run can never go green
    by silently skipping what it was meant to test.
    """
    if in_ci():
        pytest.fail("CI=true, required for this test: %s" % reason, pytrace=False)
    pytest.skip(reason)
