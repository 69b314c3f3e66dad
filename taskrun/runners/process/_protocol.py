"""The wire between the parent and a worker process: message kinds, pickling and framing, both directions.

Every message is a pickled tuple in a frame as ``multiprocess``'s ``Connection.send_bytes``
makes it: a 4-byte big-endian length (``-1`` then 8 bytes for 2 GiB or more), then the bytes.

Parent to worker: ``(CALLS, [(call_id, fn_id, fn | None, args), ...])`` and ``(CANCEL,
call_id)``; end of file means exit. ``fn`` comes with the first call of a function the worker
does not hold: ``(bytes, sources, drop)``, the pickled function, the source lines of code
that has no file (for tracebacks), and the ids of the functions to forget first (old
versions; the parent decides, so it knows what each worker holds). ``args``: the pickled
``(args, kwargs)``, or a tuple of plain positional arguments.

Worker to parent: ``(kind, call_id, payload, seconds)`` with the kinds below (``seconds``:
how long the call ran), one message per finished call, in the order the calls arrived, so
the parent always knows which call a dead worker was running. ``(READY, None, None, 0.0)``,
sent once set up, tells the parent that calls sent to it begin now; ``(DIED, None,
exitcode, 0.0)`` says a fresh child (``max_tasks_per_worker``) ended without finishing its
call; LOG and WARN carry log records and warnings to the parent's handlers.

The worker reads with blocking reads (:func:`receive`) and writes with :class:`Sender`; the
parent writes with ``send_bytes`` and reads without ever blocking (:class:`FrameReader`).
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from typing import Any

import cloudpickle

CALLS, CANCEL = "calls", "cancel"
OK, RAISED, SKIPPED, UNPICKLABLE, LOG, WARN, DIED, READY = range(8)
PROTOCOL = pickle.HIGHEST_PROTOCOL
SMALL_FRAME = 4000  # bytes: with its header, one pipe write that cannot be split (PIPE_BUF is 4096)
_frame_header = struct.Struct("!i").pack
_unpack_header = struct.Struct("!i").unpack


def dumps(obj: Any) -> bytes:
    """Pickle with the fast standard pickler; fall back to cloudpickle (lambdas, local classes)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, PROTOCOL)


class Sender:
    """The result pipe, shared by the call loop and by log records from any thread of a task.

    Small messages are framed as ``Connection.send_bytes`` frames them (a 4-byte big-endian
    length, then the bytes) and written in one system call; larger ones go through the
    connection, which also handles partial writes.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        data = dumps(message)
        size = len(data)
        with self.lock:
            if size < SMALL_FRAME:
                os.write(self.fd, _frame_header(size) + data)  # atomic: a pipe write under PIPE_BUF
            else:
                self.conn.send_bytes(data)


def _read_exactly(fd: int, size: int) -> bytes | bytearray:
    data = os.read(fd, size)
    if len(data) == size:
        return data
    if not data:
        raise EOFError("the parent closed the call pipe in the middle of a message")
    buffer = bytearray(size)  # a big message: read the rest straight into place
    buffer[: len(data)] = data
    view = memoryview(buffer)[len(data) :]
    while len(view):
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the parent closed the call pipe in the middle of a message")
        view = view[n:]
    return buffer


def receive(fd: int) -> Any:
    """Read and unpickle one message framed as ``Connection.send_bytes`` frames it.

    Plain reads instead of the connection's own: a fresh child runs far less code, and so
    copies fewer of the pages it shares with its zygote.
    """
    header = os.read(fd, 4)
    if not header:
        raise EOFError("the parent closed the call pipe")
    if len(header) < 4:
        header += _read_exactly(fd, 4 - len(header))
    (size,) = _unpack_header(header)
    if size == -1:  # 2 GiB or more
        (size,) = struct.unpack("!Q", _read_exactly(fd, 8))
    return pickle.loads(_read_exactly(fd, size))


class FrameReader:
    """Reads the length-prefixed frames a worker's ``send_bytes`` writes, many per system call.

    The pipe is non-blocking and ``read`` never waits: the supervisor neither blocks inside a
    read (with the pool locked) nor needs a second system call to ask whether data is there
    (each one lets another thread take the GIL). A frame that has not fully arrived stays
    here until poll reports more: a small one in ``buffer``, a big one in a bytearray of its
    final size that the next reads fill in place, so a 100 MB result is copied once.
    """

    CHUNK = 1 << 16
    #: Reads one call of ``read`` makes into a big frame before it lets the supervisor go on.
    FILL_READS = 16

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buffer = bytearray()  # the start of a frame (or of its header) that is not complete yet
        self.frame: bytearray | None = None  # a big frame being filled in place
        self.filled = 0
        self.eof = False

    def read(self) -> list[bytes | bytearray] | None:
        """Read what the pipe holds now; the frames it completed, in order ([] if none). None if it held nothing.

        At the end of the pipe ``eof`` turns True; an incomplete frame there (the worker died
        while it wrote) is dropped, and every frame before it has been returned.
        """
        if self.frame is not None:
            return self._fill()
        try:
            chunk = os.read(self.fd, self.CHUNK)
        except BlockingIOError:
            return None
        if not chunk:
            self.eof = True
            return []
        buffer: bytes | bytearray
        if self.buffer:
            buffer = self.buffer
            buffer += chunk
        else:
            buffer = chunk  # the usual case, whole frames: sliced straight out of what was read
        frames: list[bytes | bytearray] = []
        pos, end = 0, len(buffer)
        while end - pos >= 4:
            (size,) = struct.unpack_from("!i", buffer, pos)
            header = 4
            if size == -1:  # a frame of 2 GiB or more
                if end - pos < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, pos + 4)
                header = 12
            start = pos + header
            if end - start >= size:
                frames.append(buffer[start : start + size])
                pos = start + size
            elif size > self.CHUNK:  # a big frame: the rest goes straight into place, as it comes
                frame = self.frame = bytearray(size)
                self.filled = end - start
                frame[: self.filled] = memoryview(buffer)[start:end]
                pos = end
                break
            else:
                break
        if buffer is chunk:
            if pos < end:
                self.buffer = bytearray(chunk[pos:])
        else:
            del self.buffer[:pos]  # what buffer is here, grown in place
        return frames

    def _fill(self) -> list[bytes | bytearray] | None:
        """Read into the big frame under way, never past its end; return it once it is complete."""
        frame = self.frame
        assert frame is not None
        size = len(frame)
        view = memoryview(frame)
        got = False
        try:
            for _ in range(self.FILL_READS):
                try:
                    n = os.readv(self.fd, [view[self.filled :]])
                except BlockingIOError:
                    break
                got = True
                if n == 0:
                    self.eof = True
                    self.frame = None  # the worker died in the middle of it
                    return []
                self.filled += n
                if self.filled == size:
                    self.frame = None
                    return [frame]
        finally:
            view.release()
        return [] if got else None
