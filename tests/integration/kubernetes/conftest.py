"""Kubernetes integration tests: the fixtures of tests/kube_fixtures.py, registered here.

When the top-level tests/conftest.py already loads kube_fixtures as a plugin, its fixtures
are used and nothing is registered twice.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

if "kube_fixtures" not in sys.modules and "tests.kube_fixtures" not in sys.modules:
    # pylint: disable-next=unused-import
    from kube_fixtures import kube_api, kube_cluster, kube_namespace, make_kube_namespace  # noqa: F401
