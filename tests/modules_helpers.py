# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running the collection's modules for real: ``ansible-playbook`` with the json callback."""

import json
import os
import shutil
import subprocess
import sys

import yaml


def ansible_playbook(tmp_path, tasks, extra_args=(), extra_vars=None, check=False, diff=False, verbosity=0,
                     env=None, callback="ansible.posix.json"):
    """Run ``tasks`` on localhost; returns (completed process, {task name: result})."""
    play = [{"name": "modules under test", "hosts": "localhost", "connection": "local", "gather_facts": False,
             "tasks": tasks}]
    path = tmp_path / ("play-%d.yml" % len(list(tmp_path.glob("play-*.yml"))))
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    binary = shutil.which("ansible-playbook", path=os.path.dirname(sys.executable)) or "ansible-playbook"
    argv = [binary, "-i", "localhost,", str(path)]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    if verbosity:
        argv.append("-" + "v" * verbosity)
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    argv += list(extra_args)
    environ = dict(os.environ, ANSIBLE_STDOUT_CALLBACK=callback, ANSIBLE_LOCALHOST_WARNING="false",
                   ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
                   ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="false")
    environ.update(env or {})
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                          cwd=str(tmp_path), timeout=900, check=False)
    results = {}
    if callback.endswith("json"):
        document = json.loads(proc.stdout[proc.stdout.index("{\n"):])
        for play_result in document["plays"]:
            for task in play_result["tasks"]:
                results[task["task"]["name"]] = task["hosts"]["localhost"]
    return proc, results
