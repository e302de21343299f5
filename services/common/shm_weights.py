"""Same-host weights: the tensors go through shared memory, gRPC carries the handle and the layout.

Sender (`SharedWeightsWriter` in services/common/weights.py, used by the orchestrator's generator
client): one memfd segment per client, mode 0600, created once at the weight set's size and
rewritten in place on every update (first touch of fresh pages runs at ~0.5 GB/s here, a copy into
touched ones at ~6 GB/s). Each tensor is copied into it
whole, CRC-32 computed block by block while the block is still in cache, and announced on the
UpdateWeightsShared stream once written, so the generator checks it while later ones are copied.

Receiver (`SharedWeightsReceiver`, in the generator): opens the segment read-only as
/proc/<pid>/fd/<fd> (only the sender's own user can: the kernel's ptrace read check on /proc/<pid>/fd,
then the file's 0600 mode), checks the boot id, the memfd name, the size and the header's nonce,
keeps it mapped from update to update, and validates every tensor in place (name, dtype, shape,
bounds, CRC-32, finite values; each exactly once). The staged tensors are read-only views of the
segment: the swap copies them into the model, so one copy per byte on each side, no staging buffer.

Lifetime: a memfd has no name under /dev/shm, so nothing is left behind when either side exits or
crashes; the memory goes when the last process holding it (the sender's fd, the generator's mapping
of the latest segment) lets go.

Writes never race reads: the generator holds a shared flock on the segment from the first message
until the swap is done; the sender takes the exclusive lock (waiting for a generator still busy
with an earlier, e.g. timed-out, update) to bump the header's generation before writing anything.
A stream whose generation is no longer the header's is refused as stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import mmap
import os
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from quartet.v1 import generator_pb2 as pb
from services.common.codec import torch_dtype
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.weight_assembler import StagedWeights, TensorSpec, _block_has_non_finite
from services.common.weight_wire import crc32

__all__ = ["HEADER_BYTES", "SharedUpdate", "SharedWeightsReceiver", "boot_id", "is_local_address"]

UPDATE_WEIGHTS_SHARED_METHOD = "/quartet.v1.Generator/UpdateWeightsShared"
MEMFD_PREFIX = "quartet-weights"
MAGIC = b"QWSHM\x00\x00\x01"
HEADER_BYTES = 4096                 # magic (8) | nonce (16) | generation (uint64 LE), padded to a page
_GENERATION_AT = 24
_ALIGN = 64
_BLOCK = 1 << 20                    # CRC / finiteness block: checked while it is in cache
DEFAULT_MESSAGE_BYTES = 16 << 20    # tensor bytes announced per stream message
_LOCK_WAIT_S = 30.0


def boot_id() -> str:
    """This kernel's boot id: equal on both sides only when they share a host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def is_local_address(address: str) -> bool:
    """True for a gRPC target on this host: unix sockets, localhost, loopback or this host's own name."""
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith("["):
        host = target[1:target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host in ("localhost", os.uname().nodename):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flock(fd: int, op: int, timeout_s: float) -> None:
    """flock with a deadline (polling: a plain blocking flock could wait forever)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                raise TimeoutError(f"segment still locked after {timeout_s:.0f} s") from None
            time.sleep(0.002)


# ---------------------------------------------------------------------------------------------
# Receiver
# ---------------------------------------------------------------------------------------------


@dataclass
class SharedUpdate:
    """What one UpdateWeightsShared stream gave: staged weights (None for a probe) and the segment lock."""

    staged: StagedWeights | None
    _fd: int | None = None

    def release(self) -> None:
        """Let the sender write again (after the swap copied the tensors out)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._fd = None


class _Mapped:
    """One opened segment: fd (for the lock), read-only shared mapping, identity."""

    def __init__(self, seg: pb.SharedSegment) -> None:
        if seg.pid <= 0:
            raise InvalidArgument("segment.pid", f"{seg.pid} is not a process id")
        if seg.fd < 0:
            raise InvalidArgument("segment.fd", f"{seg.fd} is not a file descriptor")
        mine = boot_id()
        if not seg.boot_id or seg.boot_id != mine:
            raise InvalidArgument("segment.boot_id", f"{seg.boot_id!r} is not this host's ({mine!r}): shared "
                                                     "memory works only on the generator's own host")
        path = f"/proc/{seg.pid}/fd/{seg.fd}"
        try:
            target = os.readlink(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidArgument("segment.fd", f"cannot open {path}: {e.strerror} (another host, container or "
                                                "user than the generator's?)") from None
        try:
            if not target.startswith(f"/memfd:{MEMFD_PREFIX}"):
                raise InvalidArgument("segment.fd", f"{path} is {target!r}, not a {MEMFD_PREFIX} memfd")
            size = os.fstat(fd).st_size
            if seg.size != size or size < HEADER_BYTES:
                raise InvalidArgument("segment.size", f"says {seg.size} bytes, the segment holds {size} "
                                                      f"(at least {HEADER_BYTES})")
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.size, self.key = fd, size, (seg.pid, seg.fd, seg.nonce)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        if bytes(self.bytes[:len(MAGIC) + 16]) != MAGIC + seg.nonce:
            self.close()
            raise InvalidArgument("segment.nonce", f"the segment at {path} does not hold this nonce: not the "
                                                   "segment meant (a reused process id or descriptor?)")

    def generation(self) -> int:
        return struct.unpack_from("<Q", self.map, _GENERATION_AT)[0]

    def close(self) -> None:
        self.bytes = None  # type: ignore[assignment]
        _unmap(self.map)
        os.close(self.fd)


class SharedWeightsReceiver:
    """The generator's side: validates UpdateWeightsShared streams in place. One stream at a time."""

    def __init__(self, specs: Mapping[str, TensorSpec], aliases: Mapping[str, str]) -> None:
        self.specs, self.aliases = dict(specs), dict(aliases)
        self._seg: _Mapped | None = None

    def _open(self, seg: pb.SharedSegment) -> _Mapped:
        """The segment, mapped; the mapping of the previous one is kept while the same segment comes back."""
        if self._seg is not None and self._seg.key == (seg.pid, seg.fd, seg.nonce) and self._seg.size == seg.size:
            return self._seg
        self.close()
        self._seg = _Mapped(seg)
        return self._seg

    def receive(self, messages: Iterable[pb.SharedWeights], *, current_version: int,
                is_active: Callable[[], bool] | None = None, lock_timeout_s: float = _LOCK_WAIT_S) -> SharedUpdate:
        """Consume one stream. Raises InvalidArgument naming the field, FailedPrecondition (stale version
        or generation, client gone); on success the caller must `release()` after applying."""
        it = iter(messages)
        first = next(it, None)
        if first is None or not first.HasField("segment"):
            raise InvalidArgument("segment", "the first message must name the shared-memory segment")
        seg = self._open(first.segment)
        if first.probe:
            if first.tensors or not first.last:
                raise InvalidArgument("probe", "a probe is one message marked last, with no tensors")
            return SharedUpdate(None)
        if first.version <= current_version:
            raise FailedPrecondition(f"version: update to version {first.version} refused: the generator already "
                                     f"serves version {current_version}; send a larger version")
        try:
            _flock(seg.fd, fcntl.LOCK_SH, lock_timeout_s)
        except TimeoutError as e:
            raise FailedPrecondition(f"segment: {e} by its writer") from None
        update = SharedUpdate(None, seg.fd)
        try:
            if seg.generation() != first.segment.generation:
                raise FailedPrecondition(f"segment.generation: {first.segment.generation} is stale, the segment "
                                         f"holds generation {seg.generation()} (rewritten by a newer update)")
            update.staged = _Stream(self, seg, first).run(it, is_active)
        except BaseException:
            update.release()
            raise
        return update

    def close(self) -> None:
        if self._seg is not None:
            self._seg.close()
            self._seg = None


class _Stream:
    """Validation state of one stream."""

    def __init__(self, rx: SharedWeightsReceiver, seg: _Mapped, first: pb.SharedWeights) -> None:
        self.rx, self.seg, self.first = rx, seg, first
        self.tensors: dict[str, torch.Tensor] = {}
        self.nbytes = 0
        self.t0 = time.perf_counter()

    def run(self, rest: Iterator[pb.SharedWeights], is_active: Callable[[], bool] | None) -> StagedWeights:
        msg, count = self.first, 0
        while True:
            count += 1
            if count > 1:
                if msg.HasField("segment") or msg.probe:
                    raise InvalidArgument("segment", f"message {count - 1} names a segment or probes: only the "
                                                     "first message does")
                if msg.version != self.first.version:
                    raise InvalidArgument("version", f"message {count - 1} has version {msg.version}, the stream "
                                                     f"started with {self.first.version}")
            for t in msg.tensors:
                self._check(t)
            if msg.last:
                return self._finish(count)
            msg = next(rest, None)
            if msg is None or (is_active is not None and not is_active()):
                if is_active is not None and not is_active():
                    raise FailedPrecondition(f"UpdateWeightsShared stream cancelled by the client after {count} "
                                             "messages")
                raise InvalidArgument("last", f"the stream ended after {count} messages without one marked last: "
                                              "the update is incomplete and was not applied")

    def _check(self, t: pb.SharedTensor) -> None:
        rx, name = self.rx, t.name
        canonical = rx.aliases.get(name, name)
        spec = rx.specs.get(canonical)
        field = f"weights[{name}]"
        if spec is None:
            raise InvalidArgument(field, f"unknown tensor name; this model's tensors are named like "
                                         f"{', '.join(list(rx.specs)[:3])}")
        if canonical in self.tensors:
            raise InvalidArgument(field, "sent twice in one update")
        dtype = torch_dtype(t.dtype, field=f"{field}.dtype")
        if dtype != spec.dtype:
            raise InvalidArgument(f"{field}.dtype", f"got {dtype}, the model holds {spec.dtype}")
        if tuple(t.shape) != spec.shape:
            raise InvalidArgument(f"{field}.shape", f"got {list(t.shape)}, the model holds {list(spec.shape)}")
        if t.nbytes != spec.nbytes:
            raise InvalidArgument(f"{field}.nbytes", f"got {t.nbytes}, the tensor has {spec.nbytes} bytes")
        start, end = t.offset, t.offset + t.nbytes
        if start < HEADER_BYTES or end > self.seg.size or start % spec.dtype.itemsize:
            raise InvalidArgument(f"{field}.offset", f"bytes [{start}, {end}) are not element-aligned tensor bytes "
                                                     f"of the segment's [{HEADER_BYTES}, {self.seg.size})")
        data = self.seg.bytes[start:end]
        crc, finite = _crc_and_finite(data, spec.dtype)
        if crc != t.crc32:
            raise InvalidArgument(f"{field}.crc32", f"checksum mismatch on segment bytes [{start}, {end})")
        if not finite:
            raise InvalidArgument(field, "contains NaN or infinite values; refusing to serve them")
        self.tensors[canonical] = _view(data, spec)
        self.nbytes += t.nbytes

    def _finish(self, count: int) -> StagedWeights:
        specs = self.rx.specs
        missing = [n for n in specs if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InvalidArgument("weights", f"incomplete update: missing {', '.join(missing[:5])}{more}")
        f = self.first
        if f.total_bytes and f.total_bytes != self.nbytes:
            raise InvalidArgument("total_bytes", f"first message announced {f.total_bytes} bytes, got {self.nbytes}")
        if f.total_tensors and f.total_tensors != len(self.tensors):
            raise InvalidArgument("total_tensors", f"first message announced {f.total_tensors} tensors, "
                                                   f"got {len(self.tensors)}")
        return StagedWeights(version=f.version, tensors={n: self.tensors[n] for n in specs}, nbytes=self.nbytes,
                             chunks=count, receive_seconds=time.perf_counter() - self.t0)


def _unmap(m: mmap.mmap) -> None:
    """Unmap now, or, while views of it live on (staged tensors, a traceback), when the last one goes."""
    with contextlib.suppress(BufferError):
        m.close()


def _crc_and_finite(data: np.ndarray, dtype: torch.dtype) -> tuple[int, bool]:
    """CRC-32 of `data` and whether its values (as `dtype`) are all finite: one pass, block by block."""
    typed = None
    if dtype.is_floating_point and data.size:
        typed = data.view(np.uint16) if dtype == torch.bfloat16 else data.view(
            {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype])
    crc, finite, item = 0, True, dtype.itemsize
    for i in range(0, data.size, _BLOCK):
        crc = crc32(data[i:i + _BLOCK], crc)
        if typed is not None and finite:
            finite = not _block_has_non_finite(typed[i // item:(i + _BLOCK) // item])
    return crc, finite


def _view(data: np.ndarray, spec: TensorSpec) -> torch.Tensor:
    """A read-only tensor over the segment's bytes (the swap only reads it: copy_ into the model)."""
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": read-only by design
        return torch.from_numpy(data).view(spec.dtype).view(spec.shape)
