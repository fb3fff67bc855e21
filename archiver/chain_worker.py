"""The chain preparation process (issue 23, revocation at scale).

A revocation on every camera at 10 000 viewers wraps a million chain records. Done in a thread
of the Archiver (``KeyManager._prepare_chains``) that work held the Archiver's interpreter lock
60 % of the time in the change's key period and took ingest to 0.36-0.43 of its baseline. The
wrapping (AES-GCM under each viewer's epoch KEK, the records' encoding, their sorting into the
index's key order) is done here instead, in a child process at a lower scheduling priority.

What stays in the Archiver: the viewer list and who may hold which chain, the epochs (their
openers are RSA-OAEP to the viewer, made there), the key journal, the index write (one
transaction per batch, as before), the signed chain recipients (one signer), and the decision
of which chain serves a period. The child gets, per batch, the new chains' starting states and
the KEKs of now's ratchet step of the viewers' epochs, over a pipe (never on disk), and gives
back the encoded records; it keeps nothing between batches.

The protocol is pickle over the child's stdin and stdout (its C decoder: a million records
decoded in Python would cost the Archiver what the child saves it). Both ends are this code,
run by the same user, and the child parses nothing from outside (unlike the RTSP workers,
which parse camera streams and are not trusted); still, each end decodes only the classes of
this protocol (``_Unpickler``): nothing else is ever constructed or called. The child exits
when its stdin closes, so an Archiver killed even by SIGKILL leaves no child behind.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

# The child yields the CPU to ingest (nice 0) when both want it, but still gets a share on a
# busy machine: at nice 10 it would get a tenth of a nice-0 process's share and miss the next
# key period (then the cameras start their chains themselves, on the ingest path).
PREPARE_NICE = 5


@dataclass(frozen=True)
class ViewerKek:
    """A viewer the batch may wrap for, and its epoch at now's ratchet step."""

    fingerprint: str
    fingerprint_bytes: bytes
    epoch_id: bytes
    start_period: int
    index: int
    kek: bytes
    opener: bytes | None  # the epoch's opener if it starts in this batch (journaled first)
    all_cameras: bool
    cameras: frozenset[str]
    not_after_ms: int


@dataclass(frozen=True)
class ChainStart:
    """A new chain (its S_0), or with ``first_step`` > 0 a running chain's state S_j that the
    viewers in ``only`` join from step j on (join records)."""

    camera: str
    stream: int
    chain_id: bytes
    seed: bytes
    start_period: int
    first_step: int = 0
    only: frozenset[str] | None = None


@dataclass(frozen=True)
class PrepareRequest:
    period_s: int
    now_ms: int
    viewers: list[ViewerKek]
    chains: list[ChainStart]


@dataclass(frozen=True)
class PreparedChain:
    journal: bytes  # the openers and records in journal order, one buffer
    members: tuple[str, ...]  # who it was wrapped for (the same object for the same viewers)
    expires_ms: int
    record_bytes: int
    opener_bytes: int


@dataclass(frozen=True)
class PrepareResult:
    chains: list[PreparedChain]
    # (fingerprint, chain id, camera, epoch id, valid from, record), in primary-key order
    rows: list[tuple[str, bytes, str, bytes, int, bytes]]


def prepare(request: PrepareRequest) -> PrepareResult:
    """Wraps each chain's starting state for every viewer authorized on its camera. Pure but for
    the random nonces: the same records ``Epoch.wrap_chain_encoded`` makes in the Archiver."""
    from keyservice.crypto import Epoch, KeyChain
    from keyservice.crypto.ratchet import chain_record_tail
    from keyservice.format import DataStream

    now_ms = request.now_ms
    epochs = [Epoch.resume(v.epoch_id, v.fingerprint_bytes, request.period_s, v.start_period,
                           v.index, v.kek) for v in request.viewers]
    journaled: set[str] = set()  # viewers whose new epoch's opener is already in a journal
    members_of: dict[tuple[str, ...], tuple[str, ...]] = {}
    chains: list[PreparedChain] = []
    rows: list[tuple[str, bytes, str, bytes, int, bytes]] = []
    for start in request.chains:
        chain = KeyChain(start.camera, DataStream(start.stream), start.chain_id, start.seed,
                         request.period_s, start.start_period)
        tail = chain_record_tail(chain)
        journal: list[bytes] = []
        members: list[str] = []
        expires = 2**63
        record_bytes = opener_bytes = 0
        for viewer, epoch in zip(request.viewers, epochs, strict=True):
            if not (viewer.all_cameras or start.camera in viewer.cameras):
                continue
            if start.only is not None and viewer.fingerprint not in start.only:
                continue
            if viewer.opener is not None and viewer.fingerprint not in journaled:
                journaled.add(viewer.fingerprint)
                journal.append(viewer.opener)
                opener_bytes += len(viewer.opener)
            record = epoch.wrap_chain_encoded(chain, start.seed, now_ms, os.urandom, tail,
                                              first_step=start.first_step)
            journal.append(record)
            record_bytes += len(record)
            members.append(viewer.fingerprint)
            expires = min(expires, viewer.not_after_ms)
            rows.append((viewer.fingerprint, start.chain_id, start.camera, viewer.epoch_id,
                         now_ms, record))
        key = tuple(members)
        chains.append(PreparedChain(b"".join(journal), members_of.setdefault(key, key),
                                    expires, record_bytes, opener_bytes))
    # In the index's primary-key order (chain id, fingerprint): a chain's rows then go in
    # side by side, and the Archiver's own sort of them is one pass.
    rows.sort(key=lambda row: (row[1], row[0]))
    return PrepareResult(chains, rows)


_ALLOWED = {"ViewerKek", "ChainStart", "PrepareRequest", "PreparedChain", "PrepareResult"}


class _Unpickler(pickle.Unpickler):
    """Decodes the protocol's classes and plain data (bytes, str, int, tuples, lists,
    frozensets), nothing else: a corrupted stream cannot name a callable to run."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in _ALLOWED:
            return globals()[name]
        if module == "builtins" and name == "frozenset":
            return frozenset
        raise pickle.UnpicklingError(f"{module}.{name} is not part of the protocol")


def _load(stream: IO[bytes]) -> Any:
    return _Unpickler(stream).load()  # only this protocol's classes (find_class)


# The child's program. Not `python -m archiver.chain_worker`: run as __main__, this module's
# classes would be pickled as `__main__.X`, not as the names both ends import.
_CHILD = "import sys\nfrom archiver.chain_worker import main\nsys.exit(main())"


class ChainWorkerFailed(RuntimeError):
    pass


class ChainWorker:
    """The Archiver's handle on its preparation process: started on first use, restarted
    after it died. Used by one thread at a time (the KeyManager's preparing thread)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def _started(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._reap(proc)
            proc = subprocess.Popen([sys.executable, "-P", "-c", _CHILD],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    close_fds=True)
            self._proc = proc
            self.starts += 1
        return proc

    def prepare(self, request: PrepareRequest) -> PrepareResult:
        with self._lock:
            proc = self._started()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                pickle.dump(request, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
                answer = _load(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._reap(proc)
                self._proc = None
                raise ChainWorkerFailed(
                    f"the chain preparation process stopped ({exc.__class__.__name__})") from None
            if isinstance(answer, str):
                raise ChainWorkerFailed(f"the chain preparation process failed: {answer}")
            if not isinstance(answer, PrepareResult):
                self._reap(proc)
                self._proc = None
                raise ChainWorkerFailed("the chain preparation process answered nonsense")
            return answer

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kills the process now, even while a batch is exchanged (the caller then fails)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        """Ends the process (closing its stdin: it exits)."""
        with self._lock:
            if self._proc is not None:
                self._reap(self._proc)
                self._proc = None


def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    while True:
        try:
            request: Any = _load(requests)
        except EOFError:
            return  # the Archiver closed the pipe (or died): nothing more to do
        try:
            if not isinstance(request, PrepareRequest):
                raise TypeError("not a PrepareRequest")
            answer: PrepareResult | str = prepare(request)
        except Exception as exc:  # reported to the Archiver, which logs it
            answer = f"{exc.__class__.__name__}: {exc}"
        del request  # the seeds and KEKs: not kept between batches
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()
        del answer


def main() -> int:
    try:
        os.nice(PREPARE_NICE)
    except OSError:
        pass
    # It holds chain states and KEKs: a crash must not write them to a core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # stdout carries the answers only: anything printed by mistake would corrupt them.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, answers)
    return 0
