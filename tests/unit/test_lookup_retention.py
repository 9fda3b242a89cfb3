# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``biometrics.backup.retention`` lookup: loaded by Ansible's plugin loader (option
handling as Ansible does it) and run inside a real ``ansible-playbook``."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ansible.errors import AnsibleLookupError
from ansible.plugins.loader import init_plugin_loader, lookup_loader
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

BACKUPS = ["2024-01-%02dT%02d:00:00Z" % (day, hour) for day in range(1, 11) for hour in (3, 15)]


def _collection_modules():
    return {name: module for name, module in sys.modules.items()
            if name == "ansible_collections" or name.startswith("ansible_collections.")}


@pytest.fixture(scope="module")
def lookup():
    """The plugin as Ansible loads it: through its collection finder, which must import the
    collection itself to read its metadata. Other tests of this process imported the
    collection as a plain package, so their modules are set aside and put back afterwards."""
    saved = _collection_modules()
    for name in saved:
        del sys.modules[name]
    init_plugin_loader()
    try:
        plugin = lookup_loader.get("biometrics.backup.retention")
        assert plugin is not None, "lookup biometrics.backup.retention not found on %s" % os.environ.get(
            "ANSIBLE_COLLECTIONS_PATH")
        yield plugin
    finally:
        _AnsibleCollectionFinder._remove()  # pylint: disable=protected-access
        for name in _collection_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def run(lookup, terms, **options):
    result = lookup.run(terms, variables={}, **options)
    assert isinstance(result, list) and len(result) == 1
    return result[0]


def test_one_list_term_gives_keep_prune_and_reasons(lookup):
    result = run(lookup, [BACKUPS], keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=3)
    assert result["keep"] == ["2024-01-10T15:00:00Z", "2024-01-10T03:00:00Z", "2024-01-09T15:00:00Z",
                              "2024-01-08T15:00:00Z", "2024-01-07T15:00:00Z", "2024-01-01T03:00:00Z"]
    assert result["reasons"]["2024-01-01T03:00:00Z"] == ["weekly #1 (oldest, rule not filled)"]
    assert len(result["prune"]) == 14 and result["prune"][0] == "2024-01-09T03:00:00Z"


def test_restic_semantics_and_defaults(lookup):
    result = run(lookup, [BACKUPS], keep_last=2, keep_daily=3, semantics="restic")
    assert result["reasons"]["2024-01-10T15:00:00Z"] == ["last #1", "daily #1"]
    default = run(lookup, [BACKUPS], keep_daily=3)
    assert default["keep"] == ["2024-01-10T15:00:00Z", "2024-01-09T15:00:00Z", "2024-01-08T15:00:00Z"]


def test_several_terms_are_flattened_one_level_and_dicts_come_back_unchanged(lookup):
    first = [{"id": "a", "timestamp": "2024-01-01T10:00:00Z", "size": 1}]
    second = {"id": "b", "timestamp": "2024-01-02T10:00:00Z", "labels": ["x"]}
    result = run(lookup, [first, second, "2024-01-03T10:00:00Z"], keep_daily=2)
    assert result["keep"] == ["2024-01-03T10:00:00Z", second]
    assert result["prune"] == first
    assert result["reasons"] == {"2024-01-03T10:00:00Z": ["daily #1"], "b": ["daily #2"]}


def test_timezone_changes_the_days(lookup):
    backups = ["2024-01-01T22:30:00Z", "2024-01-01T23:30:00Z"]
    options = dict(keep_daily=5, semantics="restic")  # restic: no "oldest" fallback
    assert len(run(lookup, [backups], **options)["keep"]) == 1
    assert len(run(lookup, [backups], timezone="Asia/Tokyo", **options)["keep"]) == 1
    assert len(run(lookup, [backups], timezone="Europe/Berlin", **options)["keep"]) == 2
    # options do not stick to the plugin between calls
    assert len(run(lookup, [backups], **options)["keep"]) == 1


@pytest.mark.parametrize("terms, options, fragment", [
    ([BACKUPS], {"keep_daily": -3}, "keep_daily must be >= 0 or -1"),
    ([BACKUPS], {"keep_daily": "lots"}, "keep_daily"),
    ([BACKUPS], {"keep_daily": 1, "semantics": "zfs"}, "semantics 'zfs' is unknown; use one of: borg, restic"),
    ([BACKUPS], {"keep_daily": 1, "timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus'"),
    ([BACKUPS + ["last friday"]], {"keep_daily": 1}, "'last friday' is not ISO-8601"),
    ([[{"id": "x", "timestamp": "2024-01-01"}, {"id": "x", "timestamp": "2024-01-02"}]], {"keep_daily": 1},
     "duplicate backup id 'x'"),
    ([BACKUPS], {}, "keeps nothing"),
    ([BACKUPS], {"keep_daily": 0, "keep_within": ""}, "keeps nothing"),
    ([BACKUPS], {"keep_dayly": 3}, "unknown option keep_dayly"),
    ([BACKUPS], {"keep_daily": 1, "keep_within": "a week"}, "keep_within 'a week' is not a duration"),
    ([[{"timestamp": None, "id": "n1"}]], {"keep_daily": 1}, "backup 'n1'"),
])
def test_invalid_input_raises_a_lookup_error_naming_it(lookup, terms, options, fragment):
    with pytest.raises(AnsibleLookupError) as info:
        lookup.run(terms, variables={}, **options)
    assert fragment in str(info.value)


PLAYBOOK = textwrap.dedent("""\
    - hosts: localhost
      gather_facts: false
      vars:
        history: "{{ query('ansible.builtin.sequence', 'start=1 end=31 format=2024-03-%02dT02:00:00Z') }}"
      tasks:
        - name: Seed policy over March 2024, borg meaning
          ansible.builtin.set_fact:
            seed: "{{ lookup('biometrics.backup.retention', history, keep_daily=7, keep_weekly=2, keep_monthly=1) }}"
        - name: The same with query() and restic meaning
          ansible.builtin.set_fact:
            restic: "{{ query('biometrics.backup.retention', history, keep_daily=7, keep_weekly=2, semantics='restic') }}"
        - name: Several terms and dict items
          ansible.builtin.set_fact:
            terms: >-
              {{ lookup('biometrics.backup.retention',
                        [{'id': 'old', 'timestamp': '2023-12-31T23:00:00Z'}],
                        [{'id': 'new', 'timestamp': '2024-01-01T01:00:00Z'}],
                        keep_daily=1, timezone='America/New_York') }}
        - name: An invalid policy fails with the lookup's message
          block:
            - name: keep_weekly=-4
              ansible.builtin.debug:
                msg: "{{ lookup('biometrics.backup.retention', history, keep_weekly=-4) }}"
          rescue:
            - name: Remember the error
              ansible.builtin.set_fact:
                invalid_message: "{{ ansible_failed_result.msg }}"
        - name: Print results for the test
          ansible.builtin.debug:
            msg: "RESULT {{ {'seed': seed, 'restic': restic, 'terms': terms, 'invalid': invalid_message} | to_json }}"
    """)


def test_inside_a_real_playbook(tmp_path):
    playbook = tmp_path / "retention.yml"
    playbook.write_text(PLAYBOOK)
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    bindir = os.path.dirname(sys.executable)
    done = subprocess.run([os.path.join(bindir, "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if '"msg": "RESULT ' in line)
    payload = json.loads(json.loads("{" + line.strip().rstrip(",") + "}")["msg"][len("RESULT "):])
    seed = payload["seed"]
    # March 2024: 31 daily backups. daily 1..7 = 31..25 March; weekly: W12 (18-24) -> 24 Mar,
    # W11 -> 17 Mar; monthly: March is used up by 31 Mar, the rule runs out: oldest (1 Mar).
    assert seed["keep"] == ["2024-03-%02dT02:00:00Z" % day for day in (31, 30, 29, 28, 27, 26, 25, 24, 17, 1)]
    assert seed["reasons"]["2024-03-01T02:00:00Z"] == ["monthly #1 (oldest, rule not filled)"]
    assert len(seed["prune"]) == 21
    restic = payload["restic"]
    assert isinstance(restic, list) and len(restic) == 1
    assert restic[0]["reasons"]["2024-03-31T02:00:00Z"] == ["daily #1", "weekly #1"]
    assert restic[0]["keep"][-1] == "2024-03-24T02:00:00Z"
    # 2023-12-31T23:00Z and 2024-01-01T01:00Z are both 31 Dec in New York.
    assert payload["terms"]["keep"] == [{"id": "new", "timestamp": "2024-01-01T01:00:00Z"}]
    assert payload["terms"]["reasons"] == {"new": ["daily #1"]}
    assert "keep_weekly must be >= 0 or -1 (unlimited), got -4" in payload["invalid"]


def test_base_backups_name_the_wal_range_kept(lookup):
    """PostgreSQL base backups (manifests as the catalog lists them): the oldest kept one says
    from which WAL segment on the WAL job is kept."""
    bases = [{"id": "b%d" % day, "job": "db", "kind": "postgres_base", "timestamp": "2024-01-%02dT02:00:00Z" % day,
              "stats": {"timeline": 1, "wal_job": "db-wal", "wal_start": "0000000100000000000000%02X" % (day * 3)}}
             for day in (1, 8, 15)]
    result = run(lookup, [bases], keep_weekly=2)
    assert [b["id"] for b in result["keep"]] == ["b15", "b8"]
    assert result["wal_keep_from"] == "000000010000000000000018"
    assert result["reasons"]["b8"] == ["weekly #2", "oldest kept base backup: WAL of job db-wal kept from "
                                       "000000010000000000000018 on (older WAL is pruned)"]
    assert result["reasons"]["b15"] == ["weekly #1"]
    assert "wal_keep_from" not in run(lookup, [BACKUPS], keep_daily=3)
