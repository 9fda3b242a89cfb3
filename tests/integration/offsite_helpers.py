# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the offsite-copy tests share: a second SeaweedFS with credentials of its own."""

import pytest

from server_fixtures import server_dir, start_s3, start_with_port_retry, stop_s3


@pytest.fixture(scope="module")
def offsite_s3():
    """Another SeaweedFS, with credentials of its own (the offsite site)."""
    with server_dir("s3-offsite") as base:
        server = start_with_port_retry(lambda: start_s3(base))
        try:
            yield server
        finally:
            stop_s3(server)
