import math

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.anomaly import (
    FAIL, OK, WARN, SizePolicy, evaluate_size, previous_successful, size_change_ratio)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError


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
    assert verdict.as_dict() == {"level": FAIL, "ratio": None, "previous_bytes": 0, "reason": verdict.reason}
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
