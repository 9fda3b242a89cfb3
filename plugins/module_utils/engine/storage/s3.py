"""S3-compatible backend (AWS S3, SeaweedFS, MinIO, Ceph RGW) through boto3.

Large objects go up as multipart uploads whose parts are sent by a small thread pool while
the next part fills, so network I/O overlaps with compression and encryption upstream.
A multipart upload is invisible until completed, which gives the same all-or-nothing
publication as rename on a filesystem.

A stream's size is not known in advance, and S3 allows at most 10,000 parts per upload:
at a fixed 16 MiB that caps an object at 156 GiB. So the part size grows during the upload
(``PartSchedule``): the configured ``part_size`` for the first 625 parts, then doubling
every 625 parts up to 1 GiB, which stores S3's largest object (5 TiB) in fewer than 10,000
parts from any part size S3 accepts. Memory is bounded by ``(max_in_flight + 1)`` times the
current part size: parts only grow once the object is large (docs/performance.md).
"""

import threading

from ..errors import MissingDependencyError, NotFoundError, StorageError
from .base import IncompleteUpload, MissingLocationError, ObjectInfo, ObjectWriter, Storage

try:
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError
    HAS_BOTO3 = True
except ImportError:  # reported by S3Storage() so that the rest of the engine works without it
    HAS_BOTO3 = False

    class BotoCoreError(Exception):
        pass

    class ClientError(Exception):
        pass

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's lower bound for every part but the last
MAX_PART_SIZE = 5 * 1024 ** 3  # S3's upper bound for one part
MAX_PARTS = 10000  # S3's upper bound on the parts of one multipart upload
MAX_OBJECT_SIZE = 5 * 1024 ** 4  # S3's largest object (5 TiB)
DEFAULT_PART_SIZE = 16 * 1024 * 1024
# Part-size growth of a streamed upload (PartSchedule): the size doubles every
# PARTS_PER_STEP parts until it reaches GROWTH_CEILING (a configured part_size above the
# ceiling stays as it is). From 5 MiB that is 5,778 GiB in 10,000 parts, from the default
# 16 MiB 6,865 GiB: both beyond MAX_OBJECT_SIZE, which is what ends an upload.
PARTS_PER_STEP = 625
GROWTH_CEILING = 1024 ** 3
# Attempts per request, the first included; botocore's "standard" mode backs off exponentially
# (with jitter) between them and retries throttling, 5xx answers and broken connections.
DEFAULT_MAX_ATTEMPTS = 5


def _format_size(count):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            value = count / float(1 << shift)
            return ("%d %s" % (value, unit)) if value == int(value) else ("%.1f %s" % (value, unit))
    return "%d bytes" % count


class PartSchedule:
    """The size of each part of one streamed multipart upload.

    Part ``n`` (1-based) is ``first_size * 2 ** ((n - 1) // PARTS_PER_STEP)``, but never more
    than ``max(first_size, GROWTH_CEILING)``. The module constants are read when the schedule
    is made, so a test can shrink them.
    """

    def __init__(self, first_size):
        self.first_size = first_size
        self.every = PARTS_PER_STEP
        self.ceiling = max(first_size, GROWTH_CEILING)
        self.max_parts = MAX_PARTS
        self.max_object = MAX_OBJECT_SIZE

    def size(self, number):
        """Size of part ``number`` (every part but the last has exactly this size)."""
        step = (number - 1) // self.every
        if step >= 64 or self.first_size << step >= self.ceiling:
            return self.ceiling
        return self.first_size << step

    def capacity(self, parts=None):
        """Bytes that ``parts`` full parts hold (default: as many as S3 allows)."""
        parts = self.max_parts if parts is None else parts
        total, number = 0, 1
        while number <= parts:
            size = self.size(number)
            # Parts up to the end of this step (or of ``parts``) all have ``size``.
            last = min(parts, ((number - 1) // self.every + 1) * self.every)
            total += size * (last - number + 1)
            number = last + 1
        return total

    def parts_for(self, total):
        """How many parts an object of ``total`` bytes takes (StorageError beyond S3's limits)."""
        self.check_size(total)
        parts, stored = 0, 0
        while stored < total:
            parts += 1
            stored += self.size(parts)
        return max(parts, 1)

    def check_size(self, total, key="the object"):
        if total > self.max_object:
            raise StorageError(
                "%s is larger than S3's largest object (%s): nothing was stored; split the job or "
                "use a filesystem location for it" % (key, _format_size(self.max_object)))

    def check_part(self, number, key="the object"):
        if number > self.max_parts:
            first, last = _format_size(self.first_size), _format_size(self.size(number - 1))
            raise StorageError(
                "%s needs more than S3's %d parts per upload (parts of %s): nothing was stored; "
                "raise the storage option part_size"
                % (key, self.max_parts, first if first == last else "%s growing to %s" % (first, last)))


# S3's answers that the thing a request names does not exist (per request; 404 without a body).
_NO_SUCH_KEY = ("NoSuchKey", "404", "NotFound")
_NO_SUCH_UPLOAD = ("NoSuchUpload", "404", "NotFound")
# What S3Storage._request returns when S3 answered one of the ``absent`` codes it was given.
_ABSENT = object()


def _error_code(exc):
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    return ""


def _describe_error(exc):
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return "%s: %s" % (err.get("Code", "error"), err.get("Message", "")) if err.get("Message") else err.get("Code", str(exc))
    return str(exc)


class _MultipartWriter(ObjectWriter):
    def __init__(self, storage, key, part_size, max_in_flight):
        self._s3 = storage
        self._key = storage.full_key(key)
        self._schedule = PartSchedule(part_size)
        self._part_size = part_size  # of the part being filled; grows with the schedule
        # Incoming writes are kept as they come (no copy) until a part is full, then joined
        # into one bytes object that the upload thread sends as is: one copy per part.
        self._chunks = []
        self._buffered = 0
        self._parts = {}
        self._upload_id = None
        self._size = 0
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._threads = []
        self._error = None
        self._lock = threading.Lock()

    def _start_upload(self):
        kwargs = dict(Bucket=self._s3.bucket, Key=self._key)
        kwargs.update(self._s3.sse_args())
        try:
            self._upload_id = self._s3.client.create_multipart_upload(**kwargs)["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise self._s3.wrap_error(exc, "starting upload of %s" % self._key) from None

    def _send_part(self, number, holder):
        # The part comes in a list that is emptied here: the Thread object keeps its args
        # until the thread ends, and the part must be gone before its slot frees, or the next
        # part's copy coexists with it (one part more than the bound, measured).
        body = holder.pop()
        try:
            response = self._s3.client.upload_part(
                Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=body)
            with self._lock:
                self._parts[number] = response["ETag"]
        except Exception as exc:  # pylint: disable=broad-except  # surfaced in write/commit
            with self._lock:
                self._error = self._error or exc
        finally:
            body = None
            self._slots.release()

    def _flush_part(self):
        """Send the buffered bytes as the next part; the next part's size follows the schedule."""
        if self._error is not None:
            raise self._s3.wrap_error(self._error, "uploading %s" % self._key)
        number = len(self._threads) + 1
        self._schedule.check_part(number, self._key)
        if self._upload_id is None:
            self._start_upload()
        # Back-pressure: at most max_in_flight parts sending. The slot is taken before the
        # chunks are joined, so the copy never coexists with max_in_flight parts in flight:
        # memory stays at (max_in_flight + 1) parts.
        self._slots.acquire()
        try:
            thread = threading.Thread(target=self._send_part, args=(number, [self._take_buffered()]), daemon=True)
            thread.start()
        except BaseException:
            self._slots.release()
            raise
        self._threads.append(thread)
        self._part_size = self._schedule.size(number + 1)

    def _take_buffered(self):
        data = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        return data

    def write(self, data):
        if not isinstance(data, bytes):
            data = bytes(data)  # kept by reference until the part is sent: must not change
        try:
            self._schedule.check_size(self._size + len(data), self._key)
        except StorageError:
            self.abort()
            raise
        self._size += len(data)
        view = memoryview(data)
        while len(view):
            piece = view[:self._part_size - self._buffered]
            view = view[len(piece):]
            self._chunks.append(piece)
            self._buffered += len(piece)
            if self._buffered == self._part_size:
                try:
                    self._flush_part()
                except StorageError:
                    self.abort()
                    raise

    def commit(self):
        try:
            if self._upload_id is None:
                # Small object: one PUT, no multipart overhead.
                kwargs = dict(Bucket=self._s3.bucket, Key=self._key, Body=self._take_buffered())
                kwargs.update(self._s3.sse_args())
                self._s3.client.put_object(**kwargs)
                return self._size
            if self._buffered:
                self._flush_part()
            for thread in self._threads:
                thread.join()
            if self._error is not None:
                raise self._s3.wrap_error(self._error, "uploading %s" % self._key)
            parts = [{"PartNumber": n, "ETag": self._parts[n]} for n in sorted(self._parts)]
            self._s3.client.complete_multipart_upload(
                Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": parts})
            return self._size
        except (BotoCoreError, ClientError) as exc:
            self.abort()
            raise self._s3.wrap_error(exc, "uploading %s" % self._key) from None
        except StorageError:
            self.abort()
            raise

    def abort(self):
        for thread in self._threads:
            thread.join()
        self._chunks = []
        self._buffered = 0
        if self._upload_id is not None:
            try:
                self._s3.client.abort_multipart_upload(
                    Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id)
            except (BotoCoreError, ClientError):
                pass  # left for prune's stale-upload sweep
            self._upload_id = None


class _BodyReader:
    """File-like view of a GetObject body (botocore's StreamingBody lacks readinto).

    A connection that breaks mid-body surfaces as a StorageError naming the object, not as
    a bare urllib3/botocore exception that readers further down would take for corrupt data.
    """

    def __init__(self, body, storage=None, key=None):
        self._body = body
        self._storage = storage
        self._key = key

    def read(self, size=-1):
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except Exception as exc:  # pylint: disable=broad-except  # urllib3, botocore, socket errors
            if self._storage is None:
                raise
            raise self._storage.wrap_error(exc, "reading %s" % self._key) from None

    def close(self):
        self._body.close()


class S3Storage(Storage):
    backend = "s3"

    def __init__(self, bucket, prefix="", endpoint_url=None, region=None, access_key=None,
                 secret_key=None, session_token=None, path_style=True, verify_tls=True,
                 server_side_encryption=None, sse_kms_key_id=None,
                 part_size=DEFAULT_PART_SIZE, max_in_flight=2, max_attempts=DEFAULT_MAX_ATTEMPTS):
        if not HAS_BOTO3:
            raise MissingDependencyError("boto3", "the s3 storage backend")
        if not bucket:
            raise StorageError("s3 storage needs a bucket name")
        if part_size < MIN_PART_SIZE:
            raise StorageError("s3 part_size must be at least %d bytes" % MIN_PART_SIZE)
        if part_size > MAX_PART_SIZE:
            raise StorageError("s3 part_size must be at most %d bytes (5 GiB), got %d" % (MAX_PART_SIZE, part_size))
        self.bucket = bucket
        self.prefix = (prefix or "").strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.max_in_flight = max_in_flight
        self.server_side_encryption = server_side_encryption
        self.sse_kms_key_id = sse_kms_key_id
        config = BotoConfig(
            s3={"addressing_style": "path" if path_style else "auto"},
            # total_max_attempts counts the first request; botocore's max_attempts would not.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},  # exponential backoff
            max_pool_connections=max(10, max_in_flight + 4),
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            aws_session_token=session_token, config=config, verify=verify_tls)

    def full_key(self, key):
        return "%s/%s" % (self.prefix, key) if self.prefix else key

    def _relative(self, full):
        return full[len(self.prefix) + 1:] if self.prefix else full

    def sse_args(self):
        args = {}
        if self.server_side_encryption:
            args["ServerSideEncryption"] = self.server_side_encryption
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args

    def wrap_error(self, exc, doing):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return MissingLocationError("s3 bucket %r does not exist at %s" % (self.bucket, self.endpoint_url or "AWS"))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError("s3 refused %s in bucket %r: check the access key and secret (%s)"
                                % (doing, self.bucket, code))
        return StorageError("s3 error while %s: %s" % (doing, _describe_error(exc)))

    def _request(self, doing, call, absent=(), **kwargs):
        """``call(**kwargs)`` (one S3 request, or a function paging through several): its result,
        ``_ABSENT`` when S3 answers with a code in ``absent`` (the caller says what missing
        means), any other failure as the engine's error for ``doing``."""
        try:
            return call(**kwargs)
        except ClientError as exc:
            if _error_code(exc) in absent:
                return _ABSENT
            raise self.wrap_error(exc, doing) from None
        except BotoCoreError as exc:
            raise self.wrap_error(exc, doing) from None

    def ensure_ready(self):
        """Fail early (before any source is read) when the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise MissingLocationError("s3 bucket %r does not exist at %s"
                                           % (self.bucket, self.endpoint_url or "AWS")) from None
            raise self.wrap_error(exc, "checking the bucket") from None
        except BotoCoreError as exc:
            raise StorageError("cannot reach s3 endpoint %s: %s" % (self.endpoint_url, exc)) from None

    def open_writer(self, key):
        return _MultipartWriter(self, key, self.part_size, self.max_in_flight)

    def open_reader(self, key):
        response = self._request("reading %s" % key, self.client.get_object, _NO_SUCH_KEY,
                                 Bucket=self.bucket, Key=self.full_key(key))
        if response is _ABSENT:
            raise NotFoundError("object %s not found in s3://%s" % (key, self.bucket))
        return _BodyReader(response["Body"], self, key)

    def _listing_prefix(self, prefix):
        return self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")

    def _pages(self, operation, listed, convert, **kwargs):
        """``convert(entry)`` of every entry under ``listed`` of every page of a paginated S3 listing,
        converted page by page so that a large listing is held once (errors: the caller's)."""
        paginator = self.client.get_paginator(operation)
        return [convert(item) for page in paginator.paginate(Bucket=self.bucket, **kwargs)
                for item in page.get(listed, [])]

    def list(self, prefix=""):
        full_prefix = self._listing_prefix(prefix)
        found = self._request(
            "listing %s" % (full_prefix or "the bucket"), self._pages, operation="list_objects_v2", listed="Contents",
            convert=lambda item: ObjectInfo(self._relative(item["Key"]), item["Size"], item["LastModified"]),
            Prefix=full_prefix)
        found.sort(key=lambda info: info.key)
        return found

    def list_incomplete_uploads(self, prefix=""):
        """Multipart uploads never completed (a killed run), as IncompleteUpload tuples."""
        return self._request(
            "listing incomplete uploads", self._pages, operation="list_multipart_uploads", listed="Uploads",
            convert=lambda item: IncompleteUpload(self._relative(item["Key"]), item["UploadId"], item["Initiated"]),
            Prefix=self._listing_prefix(prefix))

    def incomplete_upload_size(self, key, upload_id):
        """``(parts, bytes)`` an unfinished upload holds on the server (one paginated ListParts),
        or None when it completed or was aborted since it was listed."""
        sizes = self._request("listing the parts of the upload of %s" % key, self._pages, _NO_SUCH_UPLOAD,
                              operation="list_parts", listed="Parts", convert=lambda part: part.get("Size", 0),
                              Key=self.full_key(key), UploadId=upload_id)
        if sizes is _ABSENT:
            return None
        return len(sizes), sum(sizes)

    def abort_incomplete_upload(self, key, upload_id):
        self._request("aborting upload of %s" % key, self.client.abort_multipart_upload,
                      Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)

    def delete(self, key):
        self._request("deleting %s" % key, self.client.delete_object, Bucket=self.bucket, Key=self.full_key(key))

    def exists(self, key):
        return self._request("checking %s" % key, self.client.head_object, _NO_SUCH_KEY,
                             Bucket=self.bucket, Key=self.full_key(key)) is not _ABSENT

    def describe(self):
        info = {"backend": "s3", "bucket": self.bucket, "prefix": self.prefix}
        if self.endpoint_url:
            info["endpoint_url"] = self.endpoint_url
        if self.region:
            info["region"] = self.region
        return info
