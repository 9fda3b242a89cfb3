#!/usr/bin/env bash
# Lay the collection out the way Ansible tools expect: .../ansible_collections/biometrics/backup.
#
#   collection-layout.sh link   build/collections/ansible_collections/biometrics/backup -> repo
#                               (pytest imports, ansible-playbook, ansible-lint; edits show at once)
#   collection-layout.sh copy   a real copy under build/sanity/ansible_collections plus
#                               kubernetes.core from the PyPI ansible bundle, for ansible-test
#   collection-layout.sh pip-bootstrap
#                               let ansible-test put pip into its virtualenvs without its
#                               download host (see hack/ansible-test-get-pip.py)
#
# Prints the collection directory it prepared (link or copy) on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_python="${VENV_PYTHON:-$root/.venv/bin/python}"

site_packages() {
  "$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

case "${1:-}" in
  link)
    link="$root/build/collections/ansible_collections/biometrics/backup"
    mkdir -p "$(dirname "$link")"
    # Re-pointed every time: cheap, and right again after the checkout was moved.
    ln -sfn "$root" "$link"
    echo "$link"
    ;;

  copy)
    collections="$root/build/sanity/ansible_collections"
    copy="$collections/biometrics/backup"
    kubernetes_core="$(site_packages)/ansible_collections/kubernetes/core"
    [[ -f "$kubernetes_core/MANIFEST.json" ]] || {
      echo "collection-layout: kubernetes.core not found at $kubernetes_core (run make venv)" >&2
      exit 1
    }
    mkdir -p "$copy" "$collections/kubernetes/core"
    # What git would not track, plus local tool state, stays out of the copy.
    rsync -a --delete --delete-excluded \
      --exclude=/.git/ --exclude=/.venv/ --exclude=/build/ --exclude=/tests/output/ \
      --exclude=/.ansible/ --exclude=__pycache__/ --exclude=.pytest_cache/ --exclude=.hypothesis/ \
      "$root/" "$copy/"
    rsync -a --delete --exclude=__pycache__/ "$kubernetes_core/" "$collections/kubernetes/core/"
    # The copy lives inside this repository's ignored build/. ansible-test looks for the
    # nearest .git upwards and would list the outer repository's tracked files (none of
    # them under build/), so the copy gets a repository of its own; untracked files count.
    git -C "$copy" init -q .
    echo "$copy"
    ;;

  pip-bootstrap)
    pip_version="$("$venv_python" - <<'PY'
from ansible_test._internal.python_requirements import get_venv_packages
from ansible_test._internal.host_configs import NativePythonConfig
import sys
version = "%d.%d" % sys.version_info[:2]
print(get_venv_packages(NativePythonConfig(version=version))["pip"])
PY
)"
    cache="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
    mkdir -p "$(dirname "$cache")"
    cp "$root/hack/ansible-test-get-pip.py" "$cache"
    echo "$cache"
    ;;

  *)
    echo "usage: $0 link|copy|pip-bootstrap" >&2
    exit 2
    ;;
esac
