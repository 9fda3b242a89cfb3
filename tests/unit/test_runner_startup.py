# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What starting the runner imports: a CronJob of any kind pays for it on every run."""

import json
import subprocess
import sys

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"


def modules_after(code):
    probe = "import sys, json\n%s\nprint(json.dumps(sorted(sys.modules)))" % code
    result = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, check=True)
    return set(json.loads(result.stdout))


def test_client_libraries_are_imported_only_when_a_kind_uses_them():
    # The Kubernetes client takes one to three seconds to import, psycopg and redis a few
    # tenths more: a files job needs none of them.
    loaded = modules_after("import %s" % RUNNER)
    assert RUNNER in loaded
    for library in ("kubernetes", "psycopg", "redis"):
        assert not {name for name in loaded if name == library or name.startswith(library + ".")}, library


def test_a_kind_gets_its_library_when_it_connects():
    loaded = modules_after(
        "from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres import connection as postgres\n"
        "from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis import connection as redis\n"
        "postgres.require_psycopg('a test')\n"
        "redis.require_redis('a test')\n"
        "postgres.sql.Identifier('x')\n")
    assert {"psycopg", "psycopg.sql", "redis"} <= loaded


def test_a_kubernetes_kind_still_gets_the_client_when_it_needs_it():
    loaded = modules_after(
        "from ansible_collections.biometrics.backup.plugins.module_utils.engine import kubeapi\n"
        "kubeapi.require_kubernetes('a test')\n"
        "conn = kubeapi.KubeConnection({'host': 'https://127.0.0.1:9', 'token': 't'}, 'test')\n"
        "conn._configuration()")
    assert {"kubernetes.client", "kubernetes.config", "kubernetes.dynamic"} <= loaded
