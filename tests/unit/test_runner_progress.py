# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner's restore progress lines: bytes, and the target's own units (tables) when it
counts them (the postgres target, from pg_restore --verbose)."""

import io
import json
import time

from ansible_collections.biometrics.backup.plugins.module_utils.engine import runner
from ansible_collections.biometrics.backup.plugins.module_utils.engine.restore import RestoreClock


def test_text_lines_say_bytes_and_tables():
    out = io.StringIO()
    report = runner.restore_progress(runner.Log(stream=out))
    report("restore", 512 << 20, 1 << 30, 4.0)
    report("restore", 1 << 30, 1 << 30, 8.0, items={"tables": (7, None)})
    report("restore", 1 << 30, 1 << 30, 9.0, items={"tables": (8, 9)})
    first, second, third = out.getvalue().splitlines()
    assert first.endswith("progress: restore 512.0 MiB of 1.0 GiB plaintext (50%), 128.0 MiB/s")
    assert second.endswith("(100%), 128.0 MiB/s, tables 7")
    assert third.endswith(", tables 8 of 9")


def test_json_lines_carry_the_counts_as_fields():
    out = io.StringIO()
    report = runner.restore_progress(runner.Log(fmt="json", stream=out))
    report("restore", 10, 20, 1.0, items={"tables": (3, None)})
    record = json.loads(out.getvalue())
    assert (record["plain_bytes"], record["total_plain_bytes"], record["tables_done"]) == (10, 20, 3)
    assert "tables_total" not in record   # unknown: JSON lines leave out what is None


def test_the_clock_reports_a_noted_count_even_when_no_byte_flows():
    calls = []
    clock = RestoreClock(lambda *args, **kwargs: calls.append((args, kwargs)), interval=0)
    clock.begin("restore", 100)
    clock.advance(100)
    clock.note("tables", 1)   # pg_restore --jobs reading its spool: no bytes, only tables
    clock.note("tables", 2)
    assert [kwargs.get("items") for args, kwargs in calls] == [None, {"tables": (1, None)}, {"tables": (2, None)}]
    assert all(args[:3] == ("restore", 100, 100) for args, kwargs in calls)


def test_a_phase_passed_in_under_a_millisecond_is_not_reported_as_zero():
    # A small payload streams in well under a millisecond (a CI run once read transfer 0.0).
    clock = RestoreClock()
    for boundary in ("select", "verify", "prepare"):
        clock.mark(boundary)
    time.sleep(0.0003)
    clock.mark("transfer")
    phases = clock.phases()
    assert 0.0003 <= phases["transfer"] < 0.5, phases
    assert sum(value for name, value in phases.items() if name != "total") <= phases["total"]
