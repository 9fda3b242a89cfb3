"""The streaming data path: source -> compress -> age -> SHA-256 -> storage, and back.

Stages run in separate threads joined by OS pipes (64 KiB kernel buffers), so memory stays
bounded whatever the backup size, and zstd (its own worker threads), age (Rust) and the
storage writer overlap: each releases the GIL while it works on a chunk.
"""

import hashlib
import os
import queue
import threading
import time

from . import codecs
from .errors import BackupError, DecryptionError, IntegrityError, ObjectMismatchError, SourceError, StorageError

CHUNK = 1 << 20


class _HashingSink:
    """Counts and hashes the stored bytes on their way to the storage writer."""

    def __init__(self, writer, progress=None):
        self._writer = writer
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._progress = progress
        self.error = None  # the storage's own error, when pyrage wrapped it on its way out

    def write(self, data):
        self.sha256.update(data)
        try:
            self._writer.write(data)
        except BackupError as exc:
            self.error = exc
            raise
        self.size += len(data)
        if self._progress is not None:
            self._progress.stored(len(data))
        return len(data)

    def flush(self):
        pass


class _HandOff:
    """Hashes and stores pyrage's output in a thread of its own, a few MiB behind it.

    pyrage calls ``write`` synchronously for every 64 KiB chunk it encrypts: hashing and
    storing inline left encryption waiting on them, and age alone ran at a quarter of the
    stock CLI's speed. Batches of up to CHUNK bytes go through a queue of ``depth`` slots,
    so memory stays bounded. A storage error is raised at the next ``write`` (pyrage then
    stops) or at ``close``.
    """

    def __init__(self, sink, depth=4):
        self._sink = sink
        self._queue = queue.Queue(maxsize=depth)
        self._batch = []
        self._batched = 0
        self._closed = False
        self._thread = _Worker(self._store, "store")
        self._thread.start()

    def _store(self):
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._thread.error is None:
                try:
                    self._sink.write(data)
                except BaseException as exc:  # pylint: disable=broad-except  # raised in the encrypting thread
                    self._thread.error = exc  # keep draining so that the writer never blocks

    def _send_batch(self):
        if self._batch:
            self._queue.put(b"".join(self._batch))
            self._batch = []
            self._batched = 0

    def write(self, data):
        if self._thread.error is not None:
            raise self._thread.error
        self._batch.append(bytes(data))
        self._batched += len(data)
        if self._batched >= CHUNK:
            self._send_batch()
        return len(data)

    def flush(self):
        pass

    def close(self):
        """Wait until every byte is stored; raise the store thread's error, if any."""
        if not self._closed:
            self._closed = True
            self._send_batch()
            self._queue.put(None)
            self._thread.join()
        if self._thread.error is not None:
            raise self._thread.error

    def discard(self):
        """Stop the store thread without raising (the caller is failing already)."""
        self._batch = []
        try:
            self.close()
        except BaseException:  # pylint: disable=broad-except  # the caller's error wins
            pass


class Progress:
    """Calls ``report(raw_bytes, stored_bytes, elapsed)`` at most every ``interval`` seconds."""

    def __init__(self, report=None, interval=5.0):
        self._report = report
        self._interval = interval
        self._start = time.monotonic()
        self._last = self._start
        self.raw_bytes = 0
        self.stored_bytes = 0

    def read(self, count):
        self.raw_bytes += count
        self._maybe_report()

    def stored(self, count):
        self.stored_bytes += count

    def _maybe_report(self):
        now = time.monotonic()
        if self._report is not None and now - self._last >= self._interval:
            self._last = now
            self._report(self.raw_bytes, self.stored_bytes, now - self._start)


def _pipe():
    """An OS pipe as (reader, writer) file objects.

    The writer is buffered on purpose: a raw ``FileIO.write`` on a pipe may write only part
    of the data when a signal interrupts it, and zstandard, zlib's callers and pyrage ignore
    the count it returns, which silently dropped bytes from the stored object. A
    ``BufferedWriter`` retries until every byte is written (or buffered for the next flush).
    """
    read_fd, write_fd = os.pipe()
    return os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")


class _Worker(threading.Thread):
    """A stage thread that keeps its exception for the caller to re-raise."""

    def __init__(self, target, name):
        super().__init__(name=name, daemon=True)
        self._work = target
        self.error = None

    def run(self):
        try:
            self._work()
        except BaseException as exc:  # pylint: disable=broad-except  # re-raised by the caller
            self.error = exc


def _pump(source, compressor, progress):
    while True:
        try:
            chunk = source.read(CHUNK)
        except BackupError:
            raise
        except OSError as exc:
            raise SourceError("reading the backup source failed: %s" % exc) from None
        if not chunk:
            break
        progress.read(len(chunk))
        compressor.write(chunk)
    compressor.close()


def store_stream(source, storage, key, compression, encryption, progress=None):
    """Stream ``source`` (a readable) into ``storage`` under ``key``; publish only on success.

    ``compression`` and ``encryption`` are settings from ``codecs``. Returns
    ``{size, sha256, raw_bytes}``. On any failure the partial object is discarded and the
    error re-raised; nothing becomes visible under ``key``.
    """
    progress = progress or Progress()
    raw_start = progress.raw_bytes  # one Progress may span several payloads of a run
    writer = storage.open_writer(key)
    sink = _HashingSink(writer, progress)
    try:
        if encryption.get("mode") == "age":
            _compress_then_encrypt(source, sink, compression, encryption, progress)
        else:
            _pump(source, codecs.compressing_writer(sink, compression), progress)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"size": sink.size, "sha256": sink.sha256.hexdigest(), "raw_bytes": progress.raw_bytes - raw_start}


def _compress_then_encrypt(source, sink, compression, encryption, progress):
    pipe_in, pipe_out = _pipe()

    def compress():
        try:
            _pump(source, codecs.compressing_writer(pipe_out, compression), progress)
        finally:
            pipe_out.close()

    worker = _Worker(compress, "compress")
    worker.start()
    encrypt_error = None
    store = _HandOff(sink)
    try:
        codecs.pyrage.encrypt_io(pipe_in, store, encryption["_recipients"])
        store.close()
    except BaseException as exc:  # pylint: disable=broad-except
        encrypt_error = exc
    finally:
        store.discard()
        pipe_in.close()  # unblocks the compressor if encryption stopped early
        worker.join()
    # The compressor's error explains a broken pipe on our side, so it goes first.
    if worker.error is not None and not isinstance(worker.error, BrokenPipeError):
        raise worker.error
    if encrypt_error is not None:
        if isinstance(encrypt_error, (BackupError, KeyboardInterrupt, SystemExit)):
            raise encrypt_error
        if sink.error is not None:
            raise sink.error  # e.g. "disk full", not pyrage's wrapping of it
        raise StorageError("encrypting or storing the payload failed: %s" % encrypt_error) from None
    if worker.error is not None:
        raise worker.error


class ReadsInto:
    """``readinto()`` and ``readable()`` from a class's ``read()``: what io.BufferedReader and
    the tools' file objects ask of a raw stream."""

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readable(self):
        return True


class _HashingReader(ReadsInto):
    """Reads stored bytes, hashing and counting them for the integrity check."""

    def __init__(self, raw):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size=-1):
        data = self._raw.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def close(self):
        self._raw.close()


class PlaintextStream:
    """Readable plaintext of one stored object; ``finish()`` proves it matched the manifest.

    Callers must read to EOF and then call ``finish()``; only then is the data known good.
    Every failure (hash, size, decryption, decompression) surfaces as IntegrityError.
    """

    def __init__(self, storage, key, expected, compression, identities=None):
        self._key = key
        self._expected = expected
        self._raw = _HashingReader(storage.open_reader(key))
        self._worker = None
        self._pipe_in = None
        if identities:
            self._pipe_in, pipe_out = _pipe()

            def decrypt():
                try:
                    codecs.pyrage.decrypt_io(self._raw, pipe_out, identities)
                finally:
                    pipe_out.close()

            self._worker = _Worker(decrypt, "decrypt")
            self._worker.start()
            compressed = self._pipe_in
        else:
            compressed = self._raw
        self._reader = codecs.decompressing_reader(compressed, compression)
        self.plain_bytes = 0

    def read(self, size=CHUNK):
        try:
            data = self._reader.read(size)
        except BackupError:
            raise
        except Exception as exc:  # pylint: disable=broad-except  # zstd/zlib errors: corrupt payload
            self._fail_from_worker()
            raise IntegrityError("%s: the payload does not decompress (%s)" % (self._key, exc)) from None
        if not data:
            self._fail_from_worker()
        self.plain_bytes += len(data)
        return data

    def _fail_from_worker(self):
        if self._worker is None:
            return
        if self._pipe_in is not None and self._worker.is_alive():
            # EOF on the decompressor while decryption still runs cannot be good: drain it.
            self._pipe_in.close()
        self._worker.join()
        error = self._worker.error
        if error is not None and not isinstance(error, BrokenPipeError):
            if isinstance(error, BackupError):
                raise error
            raise DecryptionError("%s does not decrypt with the given key, or its ciphertext is damaged (%s)"
                                  % (self._key, error))

    def finish(self):
        """Check size and SHA-256 of everything stored; raise IntegrityError on mismatch."""
        # Stop the decrypt thread first (it reads _raw), then consume any trailing bytes so
        # that the hash covers the whole object.
        self._fail_from_worker()
        while self._raw.read(CHUNK):
            pass
        if self._raw.size != self._expected["size"]:
            raise ObjectMismatchError(self._key, "size", self._expected["size"], self._raw.size)
        digest = self._raw.sha256.hexdigest()
        if digest != self._expected["sha256"]:
            raise ObjectMismatchError(self._key, "sha256", self._expected["sha256"], digest)
        return {"name": self._expected["name"], "size": self._raw.size, "sha256": digest,
                "plain_bytes": self.plain_bytes}

    def close(self):
        if self._pipe_in is not None:
            self._pipe_in.close()
        if self._worker is not None:
            self._worker.join()
        self._raw.close()


def check_object(storage, key, expected, compression, identities=None):
    """Full integrity pass of one object: hash, decrypt, decompress, discard."""
    return drain(PlaintextStream(storage, key, expected, compression, identities))


def drain(stream):
    """Read a checked plaintext stream to its end and discard it; ``finish()``'s report (its
    integrity error when size or SHA-256 differ). The stream is closed either way."""
    try:
        while stream.read(CHUNK):
            pass
        return stream.finish()
    finally:
        stream.close()


class ProducerStream:
    """A readable fed by ``produce(writable)`` running in a thread (for tar and friends)."""

    def __init__(self, produce, name="producer"):
        self._in, self._out = _pipe()

        def run():
            try:
                produce(self._out)
            finally:
                try:
                    self._out.close()
                except BrokenPipeError:
                    pass

        self._worker = _Worker(run, name)
        self._worker.start()
        self.result = None

    def read(self, size=-1):
        data = self._in.read(size)
        if not data:
            self._worker.join()
            if self._worker.error is not None:
                error = self._worker.error
                if isinstance(error, BackupError):
                    raise error
                raise SourceError("producing the backup stream failed: %s" % error) from None
        return data

    def close(self):
        self._in.close()
        self._worker.join()
