"""Offline stand-in for the get-pip.py script that ansible-test downloads.

ansible-test creates its sanity-test virtualenvs without pip and fetches a get-pip.py
from ci-files.testing.ansible.com to put pip into them. That host is not reachable
here (only package registries are), so `make sanity` saves this file where
ansible-test caches the download (~/.ansible/test/cache/get_pip_<version>.py).

It is run inside the new virtualenv with pip-install style arguments, for example
`--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel`: bootstrap the
interpreter's bundled pip with ensurepip, then install the exact pip requested from
the package index.
"""

from __future__ import annotations

import subprocess
import sys

# get-pip.py options that `pip install` does not know.
GET_PIP_ONLY_OPTIONS = {"--no-setuptools", "--no-wheel"}


def main() -> None:
    """Install pip into the running interpreter's environment."""
    pip_args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
    subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *pip_args], check=True)


if __name__ == "__main__":
    main()
