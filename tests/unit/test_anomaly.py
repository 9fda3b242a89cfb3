import io
import json
import math
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.anomaly import (
    FAIL, OK, WARN, SizePolicy, check_new_backup, evaluate_size, manifest_fields, previous_successful,
    size_change_ratio)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.manifest import MANIFEST_NAME
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage


@pytest.mark.parametrize("current, previous, expected", [
    (100, 100, 1.0),
    (150, 100, 1.5),
    (25, 100, 0.25),
    (0, 100, 0.0),
    (0, 0, 1.0),
])
def test_ratio_is_current_over_previous(current, previous, expected):
    assert size_change_ratio(current, previous) == expected


def test_ratio_without_previous_is_none_and_growth_from_empty_is_infinite():
    assert size_change_ratio(10, None) is None
    assert math.isinf(size_change_ratio(10, 0))


@pytest.mark.parametrize("bad", [-1, float("nan"), "10", True])
def test_ratio_rejects_invalid_sizes(bad):
    with pytest.raises(ConfigError):
        size_change_ratio(bad, 10)
    with pytest.raises(ConfigError):
        size_change_ratio(10, bad)


def test_default_policy_warns_outside_half_to_double():
    assert evaluate_size(100, 100).level == OK
    assert evaluate_size(200, 100).level == OK        # exactly at the bound is not beyond it
    assert evaluate_size(201, 100).level == WARN
    assert evaluate_size(50, 100).level == OK
    assert evaluate_size(49, 100).level == WARN
    assert not evaluate_size(49, 100).failed


def test_fail_wins_over_warn_and_reason_names_sizes_and_bound():
    policy = SizePolicy(warn_above=1.5, warn_below=0.8, fail_above=3, fail_below=0.1)
    verdict = evaluate_size(5, 100, policy)
    assert verdict.level == FAIL and verdict.failed
    assert verdict.ratio == 0.05
    assert "100" in verdict.reason and "5 bytes" in verdict.reason and "below 0.1" in verdict.reason
    assert evaluate_size(70, 100, policy).level == WARN
    assert evaluate_size(301, 100, policy).level == FAIL
    assert evaluate_size(200, 100, policy).level == WARN


def test_no_previous_is_ok_and_small_baselines_are_not_judged():
    first = evaluate_size(123, None)
    assert first.level == OK and first.ratio is None and first.previous_bytes is None
    tiny = evaluate_size(5000, 10, SizePolicy(min_previous_bytes=1024, fail_above=2))
    assert tiny.level == OK and tiny.ratio == 500
    judged = evaluate_size(5000, 2000, SizePolicy(min_previous_bytes=1024, fail_above=2))
    assert judged.level == FAIL


def test_disabled_bounds_never_trigger():
    policy = SizePolicy(warn_above=None, warn_below=None)
    assert evaluate_size(10**9, 1, policy).level == OK
    assert evaluate_size(0, 10**9, policy).level == OK


def test_growth_from_empty_exceeds_any_upper_bound_and_serialises_as_null():
    verdict = evaluate_size(10, 0, SizePolicy(fail_above=100))
    assert verdict.level == FAIL
    assert verdict.as_dict() == {"level": FAIL, "ratio": None, "previous_id": None, "previous_bytes": 0,
                                 "reason": verdict.reason}
    assert manifest_fields(verdict)["size_change_ratio"] is None
    assert "inf" in verdict.reason


@pytest.mark.parametrize("options", [
    {"warn_above": 0.9},
    {"warn_below": 1.2},
    {"warn_above": 3, "fail_above": 2},
    {"warn_below": 0.5, "fail_below": 0.6},
    {"fail_below": 0},
    {"min_previous_bytes": -1},
    {"warn_above": "2"},
    {"wran_above": 2},
])
def test_invalid_policies_are_rejected(options):
    with pytest.raises(ConfigError):
        SizePolicy.from_mapping(options)


def test_policy_from_mapping():
    policy = SizePolicy.from_mapping({"warn_above": 3, "fail_below": 0.1})
    assert policy == SizePolicy(warn_above=3, warn_below=0.5, fail_above=None, fail_below=0.1)
    assert SizePolicy.from_mapping(None) == SizePolicy()


def test_previous_successful_picks_newest_complete_of_same_job_before_time():
    summaries = [
        {"job": "pg", "status": "complete", "finished_at": "2024-01-01T02:00:00Z", "size_bytes": 100},
        {"job": "pg", "status": "complete", "finished_at": "2024-01-03T02:00:00Z", "size_bytes": 300},
        {"job": "pg", "status": "failed", "finished_at": "2024-01-04T02:00:00Z", "size_bytes": 1},
        {"job": "redis", "status": "complete", "finished_at": "2024-01-05T02:00:00Z", "size_bytes": 7},
        {"job": "pg", "status": "complete", "finished_at": "2024-01-02T02:00:00Z", "size_bytes": 200},
        {"job": "pg", "status": "complete", "finished_at": "2024-01-06T02:00:00Z", "size_bytes": 600},
    ]
    assert previous_successful(summaries, "pg", before="2024-01-05T00:00:00Z")["size_bytes"] == 300
    assert previous_successful(summaries, "pg")["size_bytes"] == 600
    assert previous_successful(summaries, "pg", before="2024-01-01T02:00:00Z") is None
    assert previous_successful(summaries, "files") is None


def test_previous_successful_skips_failed_size_checks_and_matches_full_or_incremental():
    summaries = [
        {"id": "a", "job": "f", "status": "complete", "finished_at": "2024-01-01T00:00:00Z",
         "size_bytes": 1000, "parent": None},
        {"id": "b", "job": "f", "status": "complete", "finished_at": "2024-01-02T00:00:00Z",
         "size_bytes": 10, "parent": "a"},
        {"id": "c", "job": "f", "status": "complete", "finished_at": "2024-01-03T00:00:00Z",
         "size_bytes": 1, "parent": None, "size_check": {"level": FAIL}},
        {"id": "d", "job": "f", "status": "complete", "finished_at": "2024-01-04T00:00:00Z",
         "size_bytes": 12, "parent": "a", "size_check": {"level": WARN}},
    ]
    assert previous_successful(summaries, "f", incremental=False)["id"] == "a"
    assert previous_successful(summaries, "f", incremental=True)["id"] == "d"
    assert previous_successful(summaries, "f", incremental=True, exclude_id="d")["id"] == "b"
    assert previous_successful(summaries, "f")["id"] == "d"


def test_a_size_check_that_is_not_an_object_reads_as_no_check():
    # manifest.json may hold any JSON there: the baseline search must not stop on it.
    summaries = [
        {"id": "a", "job": "f", "status": "complete", "finished_at": "2024-01-01T00:00:00Z", "size_bytes": 5},
        {"id": "b", "job": "f", "status": "complete", "finished_at": "2024-01-02T00:00:00Z", "size_bytes": 7,
         "size_check": "fail"},
    ]
    assert previous_successful(summaries, "f")["id"] == "b"


class _Bytes(Source):
    """A source emitting ``options['size']`` incompressible bytes (optionally as an incremental)."""

    kind = "files"

    def wants_parent(self, context):
        if not self.options.get("incremental"):
            return None
        return context.latest()

    def produce(self, emit, context):
        emit("data", io.BytesIO(bytes(range(256)) * (self.options["size"] // 256)))
        return {"bytes": self.options["size"]}


def _run(storage, size, policy, incremental=False):
    # manifests carry whole seconds: start each backup in a new second so "previous" is unambiguous
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.02)
    run = BackupRun("pg", _Bytes({"size": size, "incremental": incremental}), storage,
                    compression={"algorithm": "none"}, size_policy=policy)
    return run, run.run()


def test_backup_run_records_ratio_and_verdict_in_the_published_manifest(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    policy = {"warn_above": 1.5, "fail_below": 0.25}
    first_run, first = _run(storage, 256 * 40, policy)
    assert first_run.size_verdict.level == OK and first["size_change_ratio"] is None
    assert first["size_check"]["previous_id"] is None

    second_run, second = _run(storage, 256 * 80, policy)
    assert second_run.size_verdict.level == WARN
    assert second["size_change_ratio"] == pytest.approx(2.0)
    assert second["size_check"] == {"level": WARN, "previous_id": first["id"],
                                    "previous_bytes": first["size_bytes"],
                                    "reason": second_run.size_verdict.reason}

    third_run, third = _run(storage, 256 * 4, policy)
    assert third_run.size_verdict.failed
    stored = json.loads((tmp_path / "pg" / third["id"] / MANIFEST_NAME).read_text())
    assert stored["size_check"]["level"] == FAIL and stored["size_change_ratio"] == pytest.approx(0.05)

    # the failed one is not the baseline for the next backup: the second one is
    fourth_run, _fourth = _run(storage, 256 * 80, policy)
    assert fourth_run.size_verdict.previous_id == second["id"] and fourth_run.size_verdict.level == OK

    # an incremental is compared with incrementals only (none yet)
    inc_run, inc = _run(storage, 256, policy, incremental=True)
    assert inc["parent"] is not None and inc_run.size_verdict.ratio is None
    assert check_new_backup(Catalog(storage), dict(inc, id="x"), policy).previous_id == inc["id"]


def test_backup_run_without_size_policy_leaves_the_manifest_alone(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    run, manifest = _run(storage, 256, None)
    assert run.size_verdict is None
    assert "size_check" not in manifest and "size_change_ratio" not in manifest
    with pytest.raises(ConfigError):
        BackupRun("pg", _Bytes({"size": 256}), storage, size_policy={"warn_above": 0.5})
