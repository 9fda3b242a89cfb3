# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL arithmetic (LSNs, segment names, gaps), the tar sniffer of base backups and the
restore planner's choice of the last WAL segment: pure logic, no server."""

import io
import pathlib
import tarfile

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.wal import TarSniffer, xact_times
from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import WalState
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import parse_iso

MIB = 1 << 20


@pytest.mark.parametrize("text, value", [
    ("0/0", 0), ("0/16B3748", 0x16B3748), ("16/B374D848", 0x16B374D848), ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
    ("a/b", 0xA0000000B)])
def test_lsn_round_trip(text, value):
    assert pgwal.parse_lsn(text) == value
    assert pgwal.format_lsn(value) == text.upper()


@pytest.mark.parametrize("bad", ["", "0", "0/", "/1", "1/2/3", "G/0", "123456789/0", None, "0x10/0"])
def test_lsn_rejects_garbage(bad):
    with pytest.raises(ConfigError):
        pgwal.parse_lsn(bad)


def test_segment_names_for_default_size():
    assert pgwal.segment_of_lsn(1, "0/2000028") == "000000010000000000000002"
    assert pgwal.segment_of_lsn(1, "0/FFFFFFF") == "00000001000000000000000F"
    # 256 segments of 16 MiB per "log id": the next segment after ...FF is 1/00.
    assert pgwal.segment_name(1, 255) == "0000000100000000000000FF"
    assert pgwal.segment_name(1, 256) == "000000010000000100000000"
    assert pgwal.segment_of_lsn(3, "16/B374D848") == "0000000300000016000000B3"
    assert pgwal.parse_segment_name("0000000300000016000000B3") == (3, 0x16 * 256 + 0xB3, False)
    assert pgwal.parse_segment_name("000000010000000100000000.partial") == (1, 256, True)


def test_segment_names_for_other_sizes():
    assert pgwal.segments_per_log_id(MIB) == 4096
    assert pgwal.segment_name(2, 4096, MIB) == "000000020000000100000000"
    assert pgwal.segment_of_lsn(1, "1/00100000", 64 * MIB) == "000000010000000100000000"
    # 0x100 is a valid segment within a log id for 1 MiB segments, not for 16 MiB ones.
    assert pgwal.parse_segment_name("000000010000000000000100", MIB) == (1, 256, False)
    assert pgwal.parse_segment_name("000000010000000000000100") is None
    with pytest.raises(ConfigError):
        pgwal.check_segment_size(3 * MIB)


@pytest.mark.parametrize("name", ["00000001.history", "000000010000000000000002.backup", "0000000100000000000002",
                                  "00000000000000000000000A", "000000010000000000000002.partial.tmp",
                                  "00000001000000000000000a"])
def test_non_segment_names(name):
    assert pgwal.parse_segment_name(name) is None


def test_history_names():
    assert pgwal.history_timeline("00000002.history") == 2
    assert pgwal.history_timeline("000000010000000000000002") is None


def test_find_gaps():
    assert pgwal.find_gaps([]) == []
    assert pgwal.find_gaps([5, 3, 4, 4]) == []
    assert pgwal.find_gaps([1, 2, 5, 6, 9]) == [(3, 4), (7, 8)]
    assert pgwal.find_gaps([2, 3], first=1, last=5) == [(1, 1), (4, 5)]
    assert pgwal.find_gaps([], first=1, last=2) == [(1, 2)]
    assert pgwal.find_gaps([0, 10, 11], first=9, last=11) == [(9, 9)]
    text = pgwal.describe_gaps([(3, 3), (7, 8)], 1)
    assert text == "000000010000000000000003, 000000010000000000000007 to 000000010000000000000008"


def test_stream_break():
    assert pgwal.stream_break(None, (1, 9)) is None
    assert pgwal.stream_break((1, 4), (1, 5)) is None      # the next segment
    assert pgwal.stream_break((1, 4), (1, 3)) is None      # restreams what is stored
    assert "2 segment(s) were never stored" in pgwal.stream_break((1, 4), (1, 7))
    assert "timeline 2" in pgwal.stream_break((1, 4), (2, 5))


def _tar(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_tar_sniffer_keeps_chosen_members_in_any_chunking(chunk):
    long_name = "base/" + "x" * 150 + "/backup_manifest"
    data = _tar([("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"),
                 ("base/1/1259", b"\0" * 9000), (long_name, b"not me"), ("empty", b""),
                 ("backup_manifest", b'{"WAL-Ranges": []}')])
    sniffer = TarSniffer(io.BytesIO(data), ("backup_label", "backup_manifest"))
    out = []
    while True:
        piece = sniffer.read(chunk)
        if not piece:
            break
        out.append(piece)
    assert b"".join(out) == data, "the stream passes through unchanged"
    assert sniffer.files["backup_label"].startswith(b"START WAL LOCATION: 0/2000028")
    assert sniffer.files["backup_manifest"] == b'{"WAL-Ranges": []}'


def _wal(name, kind, finished, last_xact=None, known=True):
    tli, segno, dummy = pgwal.parse_segment_name(name)
    return {"id": name, "kind": "postgres_wal", "finished_at": finished, "size_bytes": 1,
            "stats": {"file": name, "type": kind, "timeline": tli, "segno": segno, "last_xact_time": last_xact,
                      "xact_times_known": known}}


def test_last_needed_segment_follows_transaction_times_not_storage_times():
    # Stored in one catch-up burst at 12:00: the storage time says nothing about the content.
    segments = {2: _wal("000000010000000000000002", "segment", "2026-01-01T12:00:00Z", "2026-01-01T10:00:00Z"),
                3: _wal("000000010000000000000003", "segment", "2026-01-01T12:00:00Z", None),
                4: _wal("000000010000000000000004", "segment", "2026-01-01T12:00:00Z", "2026-01-01T11:00:00Z")}
    partials = {5: _wal("000000010000000000000005", "partial", "2026-01-01T12:00:05Z", "2026-01-01T11:59:00Z")}
    candidates = [2, 3, 4, 5]
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T09:00:00Z")) == 2
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T10:30:00Z")) == 4
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T11:30:00Z")) == 5
    # No transaction ended after 11:59:30 in WAL whose times are all known.
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T11:59:30Z")) is None
    # Without pg_waldump the times of segment 3 are unknown: it may hold a later commit, so
    # the planner cannot conclude "no transaction after the target".
    segments[3] = _wal("000000010000000000000003", "segment", "2026-01-01T12:00:00Z", None, known=False)
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T11:59:30Z")) == pitr.UNKNOWN
    assert pitr._last_needed(candidates, segments, partials, parse_iso("2026-01-01T10:30:00Z")) == 4


def test_wal_state_keeps_newest_partial_first():
    manifests = [_wal("000000010000000000000005", "partial", "2026-01-01T12:00:10Z"),
                 _wal("000000010000000000000005", "partial", "2026-01-01T12:00:00Z"),
                 _wal("000000010000000000000004", "segment", "2026-01-01T11:00:00Z"),
                 {"id": "x", "kind": "postgres", "stats": {}}]
    state = WalState(manifests)
    assert list(state.segments) == ["000000010000000000000004"]
    assert [m["finished_at"] for m in state.partials["000000010000000000000005"]] == [
        "2026-01-01T12:00:10Z", "2026-01-01T12:00:00Z"]
    assert state.last_segment(16 * MIB) == (1, 4)


def test_the_last_commit_a_recovery_stopped_short_logged_is_read_from_its_log():
    # PostgreSQL logs it just before "recovery ended before configured recovery target was reached";
    # the restart that follows may replay no commit at all (engine/pitr.py).
    log = ("2026-12-06 15:18:28.750 UTC [4172] LOG:  redo done at 0/3002D58 system usage: CPU: user: 0.00 s\n"
           "2026-12-06 15:18:28.750 UTC [4172] LOG:  last completed transaction was at log time "
           "2026-12-06 15:18:06.226542+00\n"
           "2026-12-06 15:18:28.751 UTC [4172] FATAL:  recovery ended before configured recovery target was reached\n")
    found = pitr._LAST_COMMIT_RE.findall(log)  # pylint: disable=protected-access
    assert found == ["2026-12-06 15:18:06.226542+00"]
    assert pitr.pg_log_time(found[-1]) == parse_iso("2026-12-06T15:18:06.226542Z")
    assert pitr.pg_log_time("2026-12-06 17:18:06+02") == parse_iso("2026-12-06T15:18:06Z")
    assert pitr.pg_log_time("not a time") is None


def test_parse_target():
    assert pitr.parse_target("latest") is None
    assert pitr.parse_target("2026-01-01T10:00:00+02:00") == parse_iso("2026-01-01T08:00:00Z")
    with pytest.raises(ConfigError):
        pitr.parse_target("yesterday")


def test_xact_times_unknown_without_waldump(tmp_path):
    assert xact_times(str(tmp_path / "missing-tool"), str(tmp_path), "000000010000000000000001") is None


def test_base_backup_completion_time():
    precise = {"finished_at": "2026-01-01T10:00:00Z", "stats": {"completed_at": "2026-01-01T10:00:00.700000Z"}}
    assert pitr.base_completed_at(precise) == parse_iso("2026-01-01T10:00:00.7Z")
    # Without the precise time, the whole-second manifest time is rounded up, never down.
    assert pitr.base_completed_at({"finished_at": "2026-01-01T10:00:00Z", "stats": {}}) == parse_iso("2026-01-01T10:00:01Z")


def test_stored_wal_horizon_is_the_partial_copys_read_time():
    partial = _wal("000000010000000000000005", "partial", "2026-01-01T12:00:05Z", "2026-01-01T12:00:04Z")
    partial["stats"]["captured_at"] = "2026-01-01T12:00:05.830000Z"
    segment = _wal("000000010000000000000004", "segment", "2026-01-01T12:00:09Z", "2026-01-01T11:00:00Z")
    # The read time to the microsecond, not the manifest's whole second (12:00:05 would
    # refuse a target at 12:00:05.5 that the copy covers).
    assert pitr._horizon({4: segment}, {5: partial}, 5) == "2026-01-01T12:00:05.830000Z"
    del partial["stats"]["captured_at"]  # stored before the read time was recorded
    assert pitr._horizon({4: segment}, {5: partial}, 5) == "2026-01-01T12:00:05Z"
    # A complete segment as the newest file: the WAL after it may hold commits not stored
    # yet, whatever its storage time; only its own last commit is known to be stored.
    assert pitr._horizon({4: segment}, {}, 4) == "2026-01-01T11:00:00Z"
    segment["stats"]["last_xact_time"] = None
    assert pitr._horizon({4: segment}, {}, 4) is None


def test_base_wal_start_and_needed():
    assert pgwal.base_wal_start({"stats": {"wal_start": "000000020000000100000003"}}) == (
        2, 259, "000000020000000100000003")
    assert pgwal.base_wal_start({"stats": {"start_lsn": "0/5000028", "timeline": 1}}) == (
        1, 5, "000000010000000000000005")
    assert pgwal.base_wal_start({"wal_start": "000000010000000000000007"})[1] == 7  # a flat mapping
    assert pgwal.base_wal_start({"stats": {}}) is None and pgwal.base_wal_start("2026-01-01") is None
    needs = [(1, 5), (2, 12)]
    assert not pgwal.wal_needed(needs, 1, 4)
    assert pgwal.wal_needed(needs, 1, 5) and pgwal.wal_needed(needs, 2, 1) and pgwal.wal_needed(needs, 3, 1)
    assert not pgwal.wal_needed([(2, 12)], 2, 11) and not pgwal.wal_needed([(2, 12)], 1, 40)


def _streamer(tmp_path, bin_dir, logged):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.connection import PgConnection
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import WalStreamer
    return WalStreamer(PgConnection({"host": "db.invalid", "bin_dir": str(bin_dir)}, "source"), None, "db-wal",
                       str(tmp_path / "spool"), log=logged.append)


def test_a_stream_without_pg_waldump_says_once_that_it_stores_no_commit_times(tmp_path):
    logged = []
    streamer = _streamer(tmp_path, tmp_path, logged)
    assert streamer._xact_times(str(tmp_path), "000000010000000000000001") is None
    assert streamer._xact_times(str(tmp_path), "000000010000000000000002") is None
    assert logged == ["WAL is stored without commit times: pg_waldump not found in %s" % tmp_path]


def test_a_stream_whose_pg_waldump_cannot_read_the_wal_says_so_once(tmp_path):
    # The real tool on a file that is not WAL of its version (as WAL of another major is not).
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_waldump"))
    if not found:
        pytest.skip("no pg_waldump installed (make deps installs one)")
    for name in ("000000010000000000000001", "000000010000000000000002"):
        (tmp_path / name).write_bytes(b"\x17" * 8192)
    logged = []
    streamer = _streamer(tmp_path, found[-1].parent, logged)
    # A partial copy may hold no whole record yet: not reported.
    assert streamer._xact_times(str(tmp_path), "000000010000000000000001", complete=False) is None
    assert logged == []
    assert streamer._xact_times(str(tmp_path), "000000010000000000000001") is None
    assert streamer._xact_times(str(tmp_path), "000000010000000000000002") is None
    assert len(logged) == 1 and "segment 000000010000000000000001 is stored without commit times" in logged[0]
    assert "own PostgreSQL major version" in logged[0]
