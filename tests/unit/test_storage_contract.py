"""engine/storage/base.Storage is the whole contract of a backend.

Every backend class implements every abstract method; the optional features have defaults in
the base class, so callers call them plainly instead of probing a backend with getattr.
The real behaviour of each backend is in tests/integration/test_storage_filesystem.py and
test_storage_s3.py.
"""

import inspect
import os
import re

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import StorageError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import location
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.base import (
    ObjectWriter, Storage)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.s3 import S3Storage

ENGINE = os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "module_utils", "engine")

BACKEND_CLASSES = [FilesystemStorage, S3Storage]

# What a caller may use on any location.
CONTRACT = ["open_writer", "open_reader", "put_bytes", "get_bytes", "list", "delete", "exists",
            "describe", "ensure_ready", "list_incomplete_uploads", "incomplete_upload_size",
            "abort_incomplete_upload", "local_directory"]


class Minimal(Storage):
    """Only the abstract methods: what the defaults of the base class give."""

    backend = "minimal"

    def open_writer(self, key):
        raise NotImplementedError

    def open_reader(self, key):
        raise NotImplementedError

    def list(self, prefix=""):
        return []

    def delete(self, key):
        pass

    def exists(self, key):
        return False

    def describe(self):
        return {"backend": self.backend}


@pytest.mark.parametrize("cls", BACKEND_CLASSES, ids=lambda cls: cls.__name__)
def test_every_backend_class_implements_the_whole_interface(cls):
    assert issubclass(cls, Storage)
    assert not cls.__abstractmethods__, "%s leaves abstract: %s" % (cls.__name__, sorted(cls.__abstractmethods__))
    for name in CONTRACT:
        assert callable(getattr(cls, name)), name
        # Same parameters as the base class: a caller written against Storage works everywhere.
        assert (list(inspect.signature(getattr(cls, name)).parameters)
                == list(inspect.signature(getattr(Storage, name)).parameters)), name


def test_the_abstract_methods_are_the_ones_a_backend_must_write():
    assert Storage.__abstractmethods__ == frozenset(
        ["open_writer", "open_reader", "list", "delete", "exists", "describe"])
    assert ObjectWriter.__abstractmethods__ == frozenset(["write", "commit", "abort"])
    with pytest.raises(TypeError):
        Storage()  # pylint: disable=abstract-class-instantiated


def test_a_backend_missing_a_method_cannot_be_built():
    class Incomplete(Storage):
        def open_reader(self, key):
            raise NotImplementedError

    with pytest.raises(TypeError, match="open_writer"):
        Incomplete()  # pylint: disable=abstract-class-instantiated


def test_defaults_of_the_optional_features():
    storage = Minimal()
    assert storage.ensure_ready() is None
    assert storage.list_incomplete_uploads() == [] and storage.list_incomplete_uploads("job/") == []
    assert storage.incomplete_upload_size("job/x", "id") is None
    assert storage.local_directory() is None
    with pytest.raises(StorageError, match="backend minimal has no incomplete uploads"):
        storage.abort_incomplete_upload("job/x", "id")


@pytest.mark.parametrize("backend", ["filesystem", "nfs"])
def test_open_storage_builds_a_storage_for_directories(tmp_path, backend):
    storage = location.open_storage({"backend": backend, "path": str(tmp_path)})
    assert isinstance(storage, Storage) and storage.backend == backend
    assert storage.local_directory() == str(tmp_path)
    assert storage.list_incomplete_uploads("job/") == []
    assert storage.incomplete_upload_size("job/x", "id") is None


def test_open_storage_builds_a_storage_for_s3():
    # Building the client sends no request; nothing listens on this port.
    storage = location.open_storage({"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(storage, Storage) and storage.backend == "s3"
    assert storage.local_directory() is None


def test_open_storage_covers_every_backend():
    assert set(location.BACKENDS) == {"filesystem", "nfs", "s3"}


def test_no_engine_module_probes_a_storage_for_methods():
    probe = re.compile(r"\b(getattr|hasattr)\(\s*[\w.]*storage\b")
    found = []
    for directory, _dirs, files in os.walk(ENGINE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, 1):
                        if probe.search(line):
                            found.append("%s:%d: %s" % (os.path.relpath(path, ENGINE), number, line.strip()))
    assert not found, "call the Storage method instead:\n" + "\n".join(found)
