"""S3-compatible backend (AWS S3, SeaweedFS, MinIO, Ceph RGW) through boto3.

Large objects go up as multipart uploads whose parts are sent by a small thread pool while
the next part fills, so network I/O overlaps with compression and encryption upstream.
Memory is bounded by ``part_size * (max_in_flight + 1)``. A multipart upload is invisible
until completed, which gives the same all-or-nothing publication as rename on a filesystem.
"""

import threading

from ..errors import MissingDependencyError, NotFoundError, StorageError
from .base import ObjectInfo, ObjectWriter, Storage

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
MAX_PARTS = 10000  # S3's upper bound on the parts of one multipart upload
DEFAULT_PART_SIZE = 16 * 1024 * 1024
# Attempts per request, the first included; botocore's "standard" mode backs off exponentially
# (with jitter) between them and retries throttling, 5xx answers and broken connections.
DEFAULT_MAX_ATTEMPTS = 5


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
        self._part_size = part_size
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

    def _send_part(self, number, body):
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
            self._slots.release()

    def _flush_part(self, body):
        if self._error is not None:
            raise self._s3.wrap_error(self._error, "uploading %s" % self._key)
        if self._upload_id is None:
            self._start_upload()
        number = len(self._threads) + 1
        if number > MAX_PARTS:
            raise StorageError(
                "%s is larger than S3 allows with part_size %d (%d parts of at most %d MiB): "
                "raise the storage option part_size" % (self._key, self._part_size, MAX_PARTS,
                                                        self._part_size >> 20))
        self._slots.acquire()  # back-pressure: at most max_in_flight parts in memory
        thread = threading.Thread(target=self._send_part, args=(number, body), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _take_buffered(self):
        data = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        return data

    def write(self, data):
        if not isinstance(data, bytes):
            data = bytes(data)  # kept by reference until the part is sent: must not change
        self._size += len(data)
        view = memoryview(data)
        while len(view):
            piece = view[:self._part_size - self._buffered]
            view = view[len(piece):]
            self._chunks.append(piece)
            self._buffered += len(piece)
            if self._buffered == self._part_size:
                self._flush_part(self._take_buffered())

    def commit(self):
        try:
            if self._upload_id is None:
                # Small object: one PUT, no multipart overhead.
                kwargs = dict(Bucket=self._s3.bucket, Key=self._key, Body=self._take_buffered())
                kwargs.update(self._s3.sse_args())
                self._s3.client.put_object(**kwargs)
                return self._size
            if self._buffered:
                self._flush_part(self._take_buffered())
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
            return StorageError("s3 bucket %r does not exist at %s" % (self.bucket, self.endpoint_url or "AWS"))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError("s3 refused %s in bucket %r: check the access key and secret (%s)"
                                % (doing, self.bucket, code))
        return StorageError("s3 error while %s: %s" % (doing, _describe_error(exc)))

    def ensure_ready(self):
        """Fail early (before any source is read) when the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError("s3 bucket %r does not exist at %s"
                                   % (self.bucket, self.endpoint_url or "AWS")) from None
            raise self.wrap_error(exc, "checking the bucket") from None
        except BotoCoreError as exc:
            raise StorageError("cannot reach s3 endpoint %s: %s" % (self.endpoint_url, exc)) from None

    def open_writer(self, key):
        return _MultipartWriter(self, key, self.part_size, self.max_in_flight)

    def open_reader(self, key):
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError("object %s not found in s3://%s" % (key, self.bucket)) from None
            raise self.wrap_error(exc, "reading %s" % key) from None
        except BotoCoreError as exc:
            raise self.wrap_error(exc, "reading %s" % key) from None
        return _BodyReader(response["Body"], self, key)

    def list(self, prefix=""):
        found = []
        full_prefix = self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(self._relative(item["Key"]), item["Size"], item["LastModified"]))
        except (BotoCoreError, ClientError) as exc:
            raise self.wrap_error(exc, "listing %s" % (full_prefix or "the bucket")) from None
        found.sort(key=lambda info: info.key)
        return found

    def list_incomplete_uploads(self, prefix=""):
        """Multipart uploads never completed (a killed run); (key, upload_id, initiated)."""
        uploads = []
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            full_prefix = self.full_key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Uploads", []):
                    uploads.append((self._relative(item["Key"]), item["UploadId"], item["Initiated"]))
        except (BotoCoreError, ClientError) as exc:
            raise self.wrap_error(exc, "listing incomplete uploads") from None
        return uploads

    def abort_incomplete_upload(self, key, upload_id):
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            raise self.wrap_error(exc, "aborting upload of %s" % key) from None

    def delete(self, key):
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self.wrap_error(exc, "deleting %s" % key) from None

    def exists(self, key):
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            return True
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self.wrap_error(exc, "checking %s" % key) from None
        except BotoCoreError as exc:
            raise self.wrap_error(exc, "checking %s" % key) from None

    def describe(self):
        info = {"backend": "s3", "bucket": self.bucket, "prefix": self.prefix}
        if self.endpoint_url:
            info["endpoint_url"] = self.endpoint_url
        if self.region:
            info["region"] = self.region
        return info
