"""Counting the tables pg_restore loaded from its --verbose stderr (kinds/postgres/target.py, TableProgress)."""

from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import TableProgress


class _Context:
    """The one RestoreContext method TableProgress calls."""

    def __init__(self):
        self.noted = []

    def note_progress(self, what, done, total=None):
        self.noted.append((what, done))


def _progress():
    context = _Context()
    return TableProgress(context), context.noted


def test_every_table_line_counts_once_and_is_not_kept_for_messages():
    progress, noted = _progress()
    lines = ['pg_restore: processing data for table "public.enrolment"',
             'pg_restore: creating INDEX "public.enrolment_pkey"',
             'pg_restore: processing data for table "public.device"',
             'pg_restore: error: could not execute query: ERROR:  relation "x" does not exist']
    assert [progress(line) for line in lines] == [True, True, True, False]
    assert noted == [("tables", 1), ("tables", 2)]


def test_lines_of_two_workers_interleaved_still_count_every_table():
    # With --jobs, pg_restore writes its "pg_restore: " prefix and the message separately, so
    # two workers sharing stderr can leave a doubled prefix and a line without one.
    progress, noted = _progress()
    lines = ['pg_restore: pg_restore: processing data for table "public.a"',
             'processing data for table "public.b"',
             'pg_restore: processing data for table "public.c"processing data for table "public.d"']
    assert all(progress(line) for line in lines)
    assert noted == [("tables", 1), ("tables", 2), ("tables", 4)]
    assert progress.loaded == 4
