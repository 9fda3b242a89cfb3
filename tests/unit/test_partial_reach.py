# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How far a partial WAL copy is trusted to hold every commit (the restore planner's horizon).

The stream reads the server's clock and WAL insert position just before it reads the partial
file from the spool; the copy reaches that clock reading only when it holds the WAL up to that
position, else only its last commit."""

import datetime

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pitr import _horizon
from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import partial_reach

CLOCK = datetime.datetime(2026, 12, 5, 1, 0, 0, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
INSERT = pgwal.parse_lsn("0/3000100")
LAST_COMMIT = "2026-12-05T00:00:00.050000Z"


def _partial(stats):
    return {"id": "p", "finished_at": "2026-12-05T00:00:01Z",
            "stats": dict({"type": "partial", "last_xact_time": LAST_COMMIT,
                           "captured_at": "2026-12-05T00:00:00.200000Z"}, **stats)}


def test_copy_holding_the_insert_position_reaches_the_clock_reading():
    stats = partial_reach((CLOCK, INSERT), INSERT)
    assert stats == {"reach_time": "2026-12-05T00:00:00.123456Z", "reach_lsn": "0/3000100",
                     "server_clock": "2026-12-05T00:00:00.123456Z"}
    assert partial_reach((CLOCK, INSERT), INSERT + 8)["reach_time"] == stats["reach_time"]
    assert _horizon({}, {3: _partial(stats)}, 3) == "2026-12-05T00:00:00.123456Z"


def test_copy_short_of_the_insert_position_reaches_only_its_last_commit():
    # A commit stamped before the clock reading may sit between the copy's end and the insert
    # position: pg_receivewal had not received it when the file was read.
    stats = partial_reach((CLOCK, INSERT), INSERT - 8)
    assert stats["reach_time"] is None and stats["reach_lsn"] == "0/3000100"
    assert _horizon({}, {3: _partial(stats)}, 3) == LAST_COMMIT
    # Without a commit in it, nothing after the earlier WAL is known to be stored.
    assert _horizon({}, {3: _partial(dict(stats, last_xact_time=None))}, 3) is None


def test_unknown_server_position_is_conservative():
    stats = partial_reach(None, INSERT)
    assert stats == {"reach_time": None, "reach_lsn": None}
    assert _horizon({}, {3: _partial(stats)}, 3) == LAST_COMMIT


def test_copies_stored_before_the_reach_was_recorded_keep_their_read_time():
    assert _horizon({}, {3: _partial({})}, 3) == "2026-12-05T00:00:00.200000Z"
    old = _partial({})
    del old["stats"]["captured_at"]
    assert _horizon({}, {3: old}, 3) == "2026-12-05T00:00:01Z"


def test_a_complete_newest_segment_reaches_its_last_commit():
    segment = {"id": "s", "finished_at": "2026-12-05T00:00:09Z",
               "stats": {"type": "segment", "last_xact_time": LAST_COMMIT}}
    assert _horizon({3: segment}, {3: _partial(partial_reach((CLOCK, INSERT), INSERT))}, 3) == LAST_COMMIT


def test_under_a_steady_load_an_earlier_reading_the_copy_reaches_gives_the_reach():
    # The newest insert LSN is ahead of the copy (pg_receivewal is always a little behind under
    # load), but the reading taken before the previous copy lies inside it: every commit stamped
    # before that earlier clock is stored.
    earlier = [(CLOCK - datetime.timedelta(seconds=20), INSERT - 4096), (CLOCK - datetime.timedelta(seconds=10), INSERT - 8)]
    stats = partial_reach((CLOCK, INSERT), INSERT - 8, earlier)
    assert stats["reach_time"] == (CLOCK - datetime.timedelta(seconds=10)).astimezone(
        datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    assert stats["reach_lsn"] == pgwal.format_lsn(INSERT - 8)
    # None of the readings reached: no reach, as before.
    assert partial_reach((CLOCK, INSERT), INSERT - 4104, earlier[1:])["reach_time"] is None
    # The newest reading reached: it wins over every earlier one.
    assert partial_reach((CLOCK, INSERT), INSERT, earlier)["reach_time"] == partial_reach((CLOCK, INSERT), INSERT)["reach_time"]
