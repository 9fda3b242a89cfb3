# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The copy destination's option documentation is the storage option's, field for field."""

import yaml

from ansible_collections.biometrics.backup.plugins.doc_fragments.copy_destination import ModuleDocFragment as Copy
from ansible_collections.biometrics.backup.plugins.doc_fragments.storage import ModuleDocFragment as Storage


def _options(text, name):
    return yaml.safe_load(text)["options"][name]


def _renamed(value, old, new):
    """The storage docs with O(storage.x) references pointing at the other option."""
    return yaml.safe_load(yaml.safe_dump(value).replace("O(%s." % old, "O(%s." % new))


def test_destination_fields_are_the_storage_fields():
    storage = _options(Storage.DOCUMENTATION, "storage")
    destination = _options(Copy.DOCUMENTATION, "destination")
    assert destination["type"] == "dict" and destination["required"] is True
    assert destination["suboptions"] == _renamed(storage["suboptions"], "storage", "destination")


def test_require_copy_fields_are_the_storage_fields():
    storage = _options(Storage.DOCUMENTATION, "storage")
    require_copy = _options(Copy.REQUIRE_COPY, "require_copy")
    assert require_copy["type"] == "dict" and "required" not in require_copy
    assert require_copy["suboptions"] == _renamed(storage["suboptions"], "storage", "require_copy")
