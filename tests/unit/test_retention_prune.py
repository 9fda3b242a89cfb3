# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/prune.py ``plan``: the safety rails around the retention policy, on manifests as
``Catalog.scan`` returns them (pure logic; storage is exercised in
tests/integration/test_backup_prune.py)."""

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import (
    REASON_NEWEST, REASON_NEWEST_VERIFIED, REASON_POLICY, parse_grace, plan)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import Policy
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import to_iso

UTC = datetime.timezone.utc
NOW = datetime.datetime(2024, 6, 30, 12, tzinfo=UTC)


def manifest(day, hour=2, status="complete", parent=None, verification=None, month=6, ident=None):
    started = datetime.datetime(2024, month, day, hour, tzinfo=UTC)
    return {
        "id": ident or started.strftime("%Y%m%dT%H%M%SZ") + "-abc123",
        "job": "db", "kind": "files", "status": status, "parent": parent,
        "started_at": to_iso(started), "finished_at": to_iso(started + datetime.timedelta(minutes=5)),
        "size_bytes": 10, "verification": verification,
    }


def ok(day):
    return {"result": "ok", "verified_at": "2024-06-%02dT06:00:00Z" % day}


def ids(entries):
    return [entry["id"] for entry in entries]


def by_id(entries):
    return {entry["id"]: entry for entry in entries}


def test_failed_backups_do_not_fill_periods_and_go_after_the_grace_period():
    good = [manifest(d) for d in (25, 26, 27)]
    failed_recent = manifest(30, hour=1, status="failed")   # 11 h before NOW
    failed_old = manifest(28, status="failed")               # 58 h before NOW
    result = plan(good + [failed_recent, failed_old], Policy(keep_daily=2), orphan_grace="24h", now=NOW)
    # Without the failed ones filling days 28 and 30, days 27 and 26 are the two kept days.
    assert ids(result["keep"]) == [failed_recent["id"], good[2]["id"], good[1]["id"]]
    assert by_id(result["keep"])[good[2]["id"]]["reasons"] == ["daily #1"]
    assert "within the grace period of 1d" in by_id(result["keep"])[failed_recent["id"]]["reasons"][0]
    pruned = by_id(result["prune"])
    assert pruned[failed_old["id"]]["reason"].startswith("failed backup (status failed), older than")
    assert pruned[good[0]["id"]]["reason"] == REASON_POLICY


def test_failed_verification_is_not_a_successful_backup():
    backups = [manifest(27), manifest(28), manifest(29, verification={"result": "failed", "verified_at": "2024-06-29T06:00:00Z"})]
    result = plan(backups, Policy(keep_daily=1), orphan_grace="1h", now=NOW)
    kept = by_id(result["keep"])
    # Day 29 failed verification: it does not count as daily #1, but as the newest complete
    # backup it is still never deleted.
    assert kept[backups[2]["id"]]["reasons"] == [REASON_NEWEST]
    assert kept[backups[1]["id"]]["reasons"] == ["daily #1"]
    assert ids(result["prune"]) == [backups[0]["id"]]


def test_newest_verified_backup_is_kept_whatever_the_policy():
    backups = [manifest(d, verification=ok(d) if d == 20 else None) for d in (20, 21, 22, 23)]
    result = plan(backups, Policy(keep_last=1), now=NOW)
    kept = by_id(result["keep"])
    assert ids(result["keep"]) == [backups[3]["id"], backups[0]["id"]]
    assert kept[backups[0]["id"]]["reasons"] == [REASON_NEWEST_VERIFIED]
    assert ids(result["prune"]) == [backups[2]["id"], backups[1]["id"]]


def test_newest_successful_is_kept_even_when_every_failure_is_newer():
    backups = [manifest(10)] + [manifest(d, status="incomplete") for d in (11, 12)]
    result = plan(backups, Policy(keep_within="1d"), orphan_grace="1d", now=NOW)
    assert ids(result["keep"]) == [backups[0]["id"]]
    assert by_id(result["keep"])[backups[0]["id"]]["reasons"] == ["within 1d"]
    assert len(result["prune"]) == 2


def test_min_keep_tops_up_with_the_newest_successful_backups():
    backups = [manifest(d) for d in range(1, 11)]
    result = plan(backups, Policy(keep_last=2), min_keep=5, now=NOW)
    assert len(result["keep"]) == 5
    assert [entry["reasons"] for entry in result["keep"]][2:] == [["min_keep=5 (at least that many successful backups stay)"]] * 3
    assert ids(result["keep"]) == ids(sorted(backups, key=lambda m: m["started_at"], reverse=True))[:5]
    # min_keep counts successful backups only
    failed = [manifest(d, hour=5, status="failed") for d in range(20, 29)]
    result = plan(backups[:1] + failed, Policy(keep_last=1), min_keep=3, orphan_grace="0", now=NOW)
    assert ids(result["keep"]) == [backups[0]["id"]]


def test_parents_of_kept_incrementals_stay_along_the_whole_chain():
    full = manifest(1, ident="full")
    inc1 = manifest(2, parent="full", ident="inc1")
    inc2 = manifest(3, parent="inc1", ident="inc2")
    other_full = manifest(4, ident="full2")
    inc3 = manifest(5, parent="full2", ident="inc3")
    result = plan([full, inc1, inc2, other_full, inc3], Policy(keep_last=1), now=NOW)
    assert ids(result["keep"]) == ["inc3", "full2"]
    assert by_id(result["keep"])["full2"]["reasons"] == ["parent of kept backup inc3"]
    # keep inc2 (the oldest surviving daily) and its chain comes along
    result = plan([full, inc1, inc2, other_full, inc3], Policy(keep_daily=3), now=NOW)
    assert ids(result["keep"]) == ["inc3", "full2", "inc2", "inc1", "full"]
    assert by_id(result["keep"])["full"]["reasons"] == ["parent of kept backup inc1"]
    assert result["prune"] == []


def test_pruned_entries_are_newest_first_so_children_go_before_parents():
    full = manifest(1, ident="full")
    incs = [manifest(d, parent="full" if d == 2 else "inc%d" % (d - 1), ident="inc%d" % d) for d in range(2, 6)]
    fresh = manifest(20, ident="fresh")
    result = plan([full] + incs + [fresh], Policy(keep_last=1), now=NOW)
    assert ids(result["prune"]) == ["inc5", "inc4", "inc3", "inc2", "full"]


def test_policy_is_validated_and_may_be_a_dict():
    result = plan([manifest(1)], {"keep_daily": 1, "semantics": "restic"}, now=NOW)
    assert ids(result["keep"]) == [manifest(1)["id"]]
    with pytest.raises(ConfigError):
        plan([manifest(1)], {"keep_daily": -5}, now=NOW)
    with pytest.raises(ConfigError):
        plan([manifest(1)], Policy(keep_daily=1), min_keep=-1, now=NOW)


@pytest.mark.parametrize("text, hours", [(None, 24), ("0", 0), (0, 0), ("36h", 36), ("2d", 48), ("1w", 168), ("1m", 744)])
def test_grace_periods(text, hours):
    assert parse_grace(text) == datetime.timedelta(hours=hours)


@pytest.mark.parametrize("text", ["soon", "-1h", True, "1y1y"])
def test_bad_grace_periods(text):
    with pytest.raises(ConfigError):
        parse_grace(text)


# -- properties ---------------------------------------------------------------------------------

@st.composite
def job_histories(draw):
    count = draw(st.integers(1, 40))
    moments = sorted(draw(st.lists(st.integers(0, 400 * 24), min_size=count, max_size=count, unique=True)))
    start = datetime.datetime(2023, 5, 1, tzinfo=UTC)
    manifests = []
    for number, hours in enumerate(moments):
        started = start + datetime.timedelta(hours=hours)
        status = draw(st.sampled_from(["complete"] * 6 + ["failed", "incomplete"]))
        verification = draw(st.sampled_from([None, None, "ok", "failed"]))
        parent = None
        if number and draw(st.booleans()):
            parent = manifests[draw(st.integers(0, number - 1))]["id"]
        manifests.append({
            "id": "b%03d" % number, "job": "j", "kind": "files", "status": status, "parent": parent,
            "started_at": to_iso(started), "finished_at": to_iso(started + datetime.timedelta(minutes=3)),
            "verification": None if verification is None else {
                "result": verification, "verified_at": to_iso(started + datetime.timedelta(hours=1))},
        })
    return manifests


policy_options = st.fixed_dictionaries({
    "keep_last": st.integers(0, 3), "keep_daily": st.integers(0, 5), "keep_weekly": st.integers(0, 3),
    "keep_monthly": st.sampled_from([0, 1, 6, -1]), "semantics": st.sampled_from(["borg", "restic"]),
}).filter(lambda options: any(v for k, v in options.items() if k != "semantics"))


@settings(max_examples=300)
@given(job_histories(), policy_options, st.integers(0, 6), st.sampled_from(["0", "12h", "30d"]))
def test_rails_hold_for_any_history(manifests, options, min_keep, grace):
    now = datetime.datetime(2024, 7, 1, tzinfo=UTC)
    result = plan(manifests, Policy(**options), min_keep=min_keep, orphan_grace=grace, now=now)
    kept = by_id(result["keep"])
    assert sorted(ids(result["keep"]) + ids(result["prune"])) == sorted(m["id"] for m in manifests)
    complete = sorted((m for m in manifests if m["status"] == "complete"), key=lambda m: m["started_at"])
    if complete:
        assert complete[-1]["id"] in kept
    verified = [m for m in complete if (m["verification"] or {}).get("result") == "ok"]
    if verified:
        assert verified[-1]["id"] in kept
    successful = [m for m in complete if (m["verification"] or {}).get("result") != "failed"]
    assert sum(1 for m in successful if m["id"] in kept) >= min(min_keep, len(successful))
    for entry in result["keep"]:  # chains are closed: every kept backup's parent is kept
        if entry["parent"] is not None:
            assert entry["parent"] in kept
    for entry in result["prune"]:
        assert entry["reason"]
    stamps = [entry["started_at"] for entry in result["prune"]]
    assert stamps == sorted(stamps, reverse=True)
