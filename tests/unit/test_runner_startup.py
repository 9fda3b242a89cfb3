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


def test_the_kubernetes_client_is_imported_only_when_a_kubernetes_kind_connects():
    # It takes one to three seconds to import; a files or postgres job never needs it.
    loaded = modules_after("import %s" % RUNNER)
    assert RUNNER in loaded
    assert not {name for name in loaded if name == "kubernetes" or name.startswith("kubernetes.")}


def test_a_kubernetes_kind_still_gets_the_client_when_it_needs_it():
    loaded = modules_after(
        "from ansible_collections.biometrics.backup.plugins.module_utils.engine import kubeapi\n"
        "kubeapi.require_kubernetes('a test')\n"
        "conn = kubeapi.KubeConnection({'host': 'https://127.0.0.1:9', 'token': 't'}, 'test')\n"
        "conn._configuration()")
    assert {"kubernetes.client", "kubernetes.config", "kubernetes.dynamic"} <= loaded
