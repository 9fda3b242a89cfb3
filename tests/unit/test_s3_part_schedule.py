"""The part-size schedule of streamed S3 uploads (engine/storage/s3.py PartSchedule).

Pure arithmetic: the real uploads along this schedule (with a shrunken part limit) run against
SeaweedFS in tests/integration/test_storage_s3.py.
"""

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import StorageError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import s3 as s3mod
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.s3 import PartSchedule

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def test_s3_limits_are_the_documented_ones():
    assert s3mod.MAX_PARTS == 10000
    assert s3mod.MIN_PART_SIZE == 5 * MiB and s3mod.MAX_PART_SIZE == 5 * GiB
    assert s3mod.MAX_OBJECT_SIZE == 5 * TiB
    assert s3mod.DEFAULT_PART_SIZE == 16 * MiB
    # The old fixed schedule: 10,000 parts of 16 MiB end at 156.25 GiB.
    assert s3mod.DEFAULT_PART_SIZE * s3mod.MAX_PARTS == 156.25 * GiB


@pytest.mark.parametrize("first", [s3mod.DEFAULT_PART_SIZE, s3mod.MIN_PART_SIZE])
def test_five_tib_fits_in_10000_parts_from_the_default_and_the_minimum(first):
    schedule = PartSchedule(first)
    assert schedule.capacity() >= 5 * TiB
    parts = schedule.parts_for(5 * TiB)
    assert parts <= 10000
    # Walk the parts one by one, as the writer does, and add them up independently.
    stored, sizes = 0, []
    for number in range(1, parts + 1):
        sizes.append(schedule.size(number))
        stored += sizes[-1]
    assert stored >= 5 * TiB and stored - sizes[-1] < 5 * TiB
    assert all(s3mod.MIN_PART_SIZE <= size <= s3mod.MAX_PART_SIZE for size in sizes)
    assert sizes == sorted(sizes)  # never shrinks
    assert max(sizes) == GiB  # the memory bound: (in flight + 1) x 1 GiB at the very top
    assert sizes[:625] == [first] * 625 and sizes[625] == 2 * first  # the configured size first


def test_exact_figures_of_the_schedule():
    default, minimum = PartSchedule(16 * MiB), PartSchedule(5 * MiB)
    # 625 parts each of 16, 32, 64, 128, 256, 512 MiB, then 6,250 of 1 GiB.
    assert default.capacity() == 625 * (16 + 32 + 64 + 128 + 256 + 512) * MiB + 6250 * GiB
    # 625 parts each of 5 ... 640 MiB (8 steps), then 5,000 of 1 GiB.
    assert minimum.capacity() == 625 * 5 * 255 * MiB + 5000 * GiB
    # Up to the old 156 GiB limit the default never goes past 256 MiB parts.
    assert default.size(default.parts_for(156 * GiB)) == 256 * MiB
    # Objects up to 9.7 GiB (625 x 16 MiB) go up exactly as before the schedule existed.
    assert default.parts_for(625 * 16 * MiB) == 625 and default.size(default.parts_for(9 * GiB)) == 16 * MiB
    assert default.size(default.parts_for(625 * 16 * MiB + 1)) == 32 * MiB


@pytest.mark.parametrize("first", [5 * MiB, 6 * MiB, 8 * MiB, 64 * MiB, 100 * MiB, 700 * MiB, GiB, 2 * GiB, 5 * GiB])
def test_every_allowed_part_size_reaches_five_tib(first):
    schedule = PartSchedule(first)
    assert schedule.capacity() >= 5 * TiB and schedule.parts_for(5 * TiB) <= 10000
    top = schedule.size(10000)
    assert top == max(first, GiB) <= s3mod.MAX_PART_SIZE  # a part_size above 1 GiB is kept, never grown


def test_an_object_beyond_five_tib_fails_clearly():
    schedule = PartSchedule(16 * MiB)
    schedule.check_size(5 * TiB)  # exactly the limit is fine
    for size in (5 * TiB + 1, 6 * TiB):
        with pytest.raises(StorageError, match=r"^j/b/data is larger than S3's largest object \(5 TiB\): "
                                               r"nothing was stored; split the job or use a filesystem location for it$"):
            schedule.check_size(size, "j/b/data")
        with pytest.raises(StorageError, match=r"larger than S3's largest object \(5 TiB\)"):
            schedule.parts_for(size)


def test_running_out_of_parts_names_the_limit_and_the_sizes(monkeypatch):
    monkeypatch.setattr(s3mod, "MAX_PARTS", 4)
    monkeypatch.setattr(s3mod, "PARTS_PER_STEP", 2)
    schedule = PartSchedule(5 * MiB)
    assert [schedule.size(n) for n in range(1, 6)] == [5 * MiB, 5 * MiB, 10 * MiB, 10 * MiB, 20 * MiB]
    assert schedule.capacity() == 30 * MiB
    schedule.check_part(4, "k")
    with pytest.raises(StorageError, match=r"^k needs more than S3's 4 parts per upload \(parts of 5 MiB growing "
                                           r"to 10 MiB\): nothing was stored; raise the storage option part_size$"):
        schedule.check_part(5, "k")
    monkeypatch.setattr(s3mod, "PARTS_PER_STEP", 625)
    with pytest.raises(StorageError, match=r"\(parts of 16 MiB\)"):
        PartSchedule(16 * MiB).check_part(5)


def test_a_part_size_beyond_what_s3_accepts_is_refused():
    pytest.importorskip("boto3")
    with pytest.raises(StorageError, match=r"part_size must be at most 5368709120 bytes \(5 GiB\), got 5368709121"):
        s3mod.S3Storage(bucket="b", endpoint_url="http://127.0.0.1:9", part_size=5 * GiB + 1)
