"""Run the collection's playbooks the way a user does: ansible-playbook in a subprocess."""

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
SITE = REPO_ROOT / "playbooks" / "site.yml"
SEED_VALUES = REPO_ROOT / "playbooks" / "values" / "seed.yml"
RECAP = re.compile(r"^localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class PlaybookRun:
    def __init__(self, process):
        self.returncode = process.returncode
        self.output = process.stdout + process.stderr
        match = RECAP.search(process.stdout)
        self.changed = int(match.group(2)) if match else None
        self.failed = int(match.group(4)) if match else None

    def __repr__(self):
        failures = [line for line in self.output.splitlines() if line.startswith(("fatal:", "failed:", "[ERROR]"))]
        return "PlaybookRun(rc=%s, changed=%s)\n%s\n...\n%s" % (
            self.returncode, self.changed, "\n".join(failures)[:4000], self.output[-3000:])


def run_site(values, tmp_path, extra_vars=None, env=None, args=()):
    """ansible-playbook playbooks/site.yml with ``values`` (a dict in the seed's schema)."""
    values_file = tmp_path / ("values-%d.yml" % len(list(tmp_path.glob("values-*.yml"))))
    values_file.write_text(yaml.safe_dump(values))
    extra = dict(extra_vars or {}, values_file=str(values_file))
    process = subprocess.run(
        ["ansible-playbook", str(SITE), "-e", json.dumps(extra), *args],
        capture_output=True, text=True, env=dict(env or os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1"),
        cwd=str(REPO_ROOT), timeout=900, check=False)
    return PlaybookRun(process)


def seed_values(**overrides):
    values = yaml.safe_load(SEED_VALUES.read_text())
    for dotted, value in overrides.items():
        node = values
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return values


def load_rendered(directory):
    """Every manifest written by render-only mode, as ``{(kind, namespace, name): manifest}``."""
    manifests = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                meta = document["metadata"]
                manifests[(document["kind"], meta.get("namespace"), meta["name"])] = document
    return manifests
