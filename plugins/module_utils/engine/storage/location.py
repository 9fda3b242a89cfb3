"""Turn the shared ``storage`` option into a Storage object.

``storage: {backend: filesystem|s3|nfs, path, bucket, prefix, endpoint_url, region,
access_key, secret_key, ...}`` — the same dict for every module, the lookup's callers and
the runner's job file.
"""

import os

from ..config import resolve_secret_refs
from ..errors import ConfigError
from .filesystem import FilesystemStorage
from .s3 import DEFAULT_MAX_ATTEMPTS, DEFAULT_PART_SIZE, S3Storage

BACKENDS = ("filesystem", "s3", "nfs")


def open_storage(options):
    if not isinstance(options, dict):
        raise ConfigError("storage must be a dict with at least 'backend'")
    # access_key_file / secret_key_env ... : unresolved, they were silently ignored and boto3
    # fell back to whatever credentials the environment or instance happened to have.
    options = resolve_secret_refs(options, "storage")
    backend = options.get("backend") or "filesystem"
    if backend not in BACKENDS:
        raise ConfigError("unknown storage backend %r: choose one of %s" % (backend, ", ".join(BACKENDS)))
    prefix = (options.get("prefix") or "").strip("/")
    if backend in ("filesystem", "nfs"):
        path = options.get("path")
        if not path:
            raise ConfigError("storage backend %s needs 'path' (an absolute directory)" % backend)
        if not os.path.isabs(path):
            raise ConfigError("storage path must be absolute, got %r" % path)
        if prefix:
            path = os.path.join(path, *prefix.split("/"))
        return FilesystemStorage(path, backend=backend)
    if not options.get("bucket"):
        raise ConfigError("storage backend s3 needs 'bucket'")
    endpoint = options.get("endpoint_url") or options.get("endpoint")
    path_style = options.get("path_style")
    if path_style is None:
        path_style = bool(endpoint)  # S3-compatible servers want path-style; AWS picks itself
    return S3Storage(
        bucket=options["bucket"], prefix=prefix, endpoint_url=endpoint,
        region=options.get("region"), access_key=options.get("access_key"),
        secret_key=options.get("secret_key"), session_token=options.get("session_token"),
        path_style=path_style, verify_tls=options.get("verify_tls", True),
        server_side_encryption=options.get("server_side_encryption"),
        sse_kms_key_id=options.get("sse_kms_key_id"),
        part_size=int(options.get("part_size") or DEFAULT_PART_SIZE),
        max_attempts=_max_attempts(options.get("max_attempts")),
    )


def _max_attempts(value):
    if value is None:
        return DEFAULT_MAX_ATTEMPTS
    try:
        attempts = int(value)
    except (TypeError, ValueError):
        attempts = 0
    if attempts < 1 or str(value).strip() != str(attempts):
        raise ConfigError("storage max_attempts must be a whole number of at least 1, got %r" % (value,))
    return attempts
