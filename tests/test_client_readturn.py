"""Who reads the socket of a blocking connection: ``_ReadTurn`` on its own (threads, driven by
events and a hand-set clock, never by sleeps), and the reader's side of a connection, which
never waits for the send lock."""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mzconnector
from mzconnector import Ack, Mim, Notice, Refused, _Reader, _ReadTurn
from tests.conftest import ServerProcess

#: How long a thread that should finish at once may take before the test fails (a bound on a
#: failure, never a wait for something to happen).
BOUND = 10


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Condition(threading.Condition):
    """A condition that tells each time a thread waits on it, and for how long it means to."""

    def __init__(self, lock: Any = None) -> None:
        super().__init__(lock)
        self.timeouts: list[float | None] = []
        self._waits = threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self._waits.release()
        return super().wait(timeout)

    def waited(self) -> bool:
        """Until a thread (next) waits on it."""
        return self._waits.acquire(timeout=BOUND)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def turn(clock: Clock) -> Iterator[_ReadTurn]:
    turn = _ReadTurn(idle=0.05, clock=clock, condition=Condition)
    yield turn
    with turn.cond:
        turn.close()
    turn.dispose()


@pytest.fixture
def cond(turn: _ReadTurn) -> Condition:
    """Where callers wait."""
    return turn.cond  # type: ignore[return-value]


@pytest.fixture
def background_cond(turn: _ReadTurn) -> Condition:
    """Where the background reader waits for its turn."""
    return turn._background  # type: ignore[return-value]


class Background:
    """The background reader's side, in a thread: ``acquire_background`` once, then (if it got
    the socket) wait in the socket, as the connection's reader does, until woken."""

    def __init__(self, turn: _ReadTurn, cond: Condition) -> None:
        self.turn = turn
        self.cond = cond
        self.got: bool | None = None
        self.acquired = threading.Event()
        self.woken = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.cond:
            self.got = self.turn.acquire_background()
        self.acquired.set()
        if not self.got:
            return
        select.select([self.turn.wake], [], [])  # the socket stays silent: only a wake ends it
        self.woken.set()
        with self.cond:
            self.turn.release_background()

    def join(self) -> None:
        self.thread.join(BOUND)
        assert not self.thread.is_alive()


def in_thread(function: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    return thread


def test_callers_read_one_at_a_time(turn: _ReadTurn, cond: Condition) -> None:
    with cond:
        turn.enter()
        turn.enter()
        assert turn.acquire()
        assert turn.reader is _Reader.CALLER
        assert not turn.acquire()  # the other caller waits for its turn
        turn.release()
        assert turn.reader is None
        assert turn.acquire()
        turn.release()
        turn.leave()
        turn.leave()


def test_the_background_reader_reads_when_nobody_waits(turn: _ReadTurn, cond: Condition) -> None:
    background = Background(turn, cond)
    assert background.acquired.wait(BOUND)
    assert background.got is True
    with cond:
        assert turn.reader is _Reader.BACKGROUND
        assert turn.background_alone()
        turn.close()  # ends it
    background.join()


def test_the_background_reader_waits_while_a_caller_waits(
    turn: _ReadTurn, cond: Condition, background_cond: Condition
) -> None:
    with cond:
        turn.enter()
    background = Background(turn, cond)
    assert background_cond.waited()  # it looked, and waits: the caller does not wake it,
    assert background_cond.timeouts[0] == pytest.approx(0.05)  # it looks again after idle
    assert background_cond.waited()  # ... and again, while the caller waits
    assert not background.acquired.is_set()
    with cond:
        turn.leave()  # the caller never read: the socket is the background reader's next
    assert background.acquired.wait(BOUND)
    assert background.got is True
    with cond:
        turn.close()
    background.join()


def test_the_background_reader_leaves_the_socket_alone_after_a_caller_read(
    turn: _ReadTurn, cond: Condition, background_cond: Condition, clock: Clock
) -> None:
    with cond:
        turn.enter()
        assert turn.acquire()
        turn.release()  # at clock.now
        turn.leave()
    background = Background(turn, cond)
    assert background_cond.waited()
    assert background_cond.timeouts[0] == pytest.approx(0.05)  # it waits out the idle time
    with cond:
        clock.now += 0.01
    assert background_cond.waited()  # looked again: still within the idle time (by the clock)
    assert background_cond.waited()
    assert background_cond.timeouts[-1] == pytest.approx(0.04)
    assert not background.acquired.is_set()
    with cond:
        clock.now += 0.04
    assert background.acquired.wait(BOUND)
    assert background.got is True
    with cond:
        turn.close()
    background.join()


def test_a_caller_wakes_the_background_reader_and_gets_the_socket(
    turn: _ReadTurn, cond: Condition
) -> None:
    background = Background(turn, cond)
    assert background.acquired.wait(BOUND)
    got = threading.Event()

    def caller() -> None:
        with cond:
            turn.enter()
            while not turn.acquire():
                cond.wait()
            got.set()
            turn.release()
            turn.leave()

    thread = in_thread(caller)
    assert background.woken.wait(BOUND)  # the caller's wake byte ended its wait in the socket
    assert got.wait(BOUND)
    thread.join(BOUND)
    background.join()
    with cond:
        assert turn.reader is None
        assert not turn.background_alone()


def test_a_reader_that_waits_for_room_lets_a_caller_in(turn: _ReadTurn, cond: Condition) -> None:
    """The background reader with a full inbox waits while it is alone; a caller that needs
    the socket makes it go on (and hand over)."""
    with cond:
        assert turn.acquire_background()
    stopped = threading.Event()

    def reader() -> None:
        with cond:
            while turn.background_alone():  # the connection's wait for room in the inbox
                stopped.set()
                cond.wait()
            turn.release_background()

    thread = in_thread(reader)
    assert stopped.wait(BOUND)
    with cond:
        turn.enter()
        assert not turn.acquire()  # asks the reader to let go
        while not turn.acquire():
            cond.wait()
        turn.release()
        turn.leave()
    thread.join(BOUND)
    assert not thread.is_alive()


def test_close_ends_a_waiting_background_reader(
    turn: _ReadTurn, cond: Condition, background_cond: Condition
) -> None:
    with cond:
        turn.enter()  # so that the background reader waits
    background = Background(turn, cond)
    assert background_cond.waited()
    with cond:
        turn.close()
    background.join()
    assert background.got is False


# -- the reader's side of a connection -------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [Ack(0), Refused([]), Mim({"x": 1}), Notice("nothing lost", 0)],
    ids=lambda e: type(e).__name__,
)
def test_the_reader_never_waits_for_the_send_lock(echo_server: ServerProcess, event: Any) -> None:
    """While a sender holds the send lock (e.g. blocked on a server that does not read), the
    thread reading the socket still applies what the server says."""
    warns = isinstance(event, Notice)
    with mzconnector.connect(echo_server.host, echo_server.port, timeout=10) as conn:
        with (
            conn._send_lock,
            pytest.warns(RuntimeWarning) if warns else contextlib.nullcontext(),
        ):
            thread = in_thread(lambda: conn._on_event(event))
            thread.join(BOUND)
            assert not thread.is_alive(), "the reader waited for the send lock"
        conn._mim_replies.clear()
        conn.dropped = 0
        assert conn.mim()["Workflow Name"] == "echo"


def test_a_connection_never_closed_gives_its_sockets_back_when_collected(
    echo_server: ServerProcess,
) -> None:
    """A notebook that drops a connection without close() (its server gone, a cell re-run)
    leaks no socket: collecting it closes them, and no ResourceWarning fires at some later,
    unrelated moment."""
    import gc

    conn = mzconnector.connect(echo_server.host, echo_server.port)
    conn._mark_closed("the test let go of it")  # as a lost server leaves it: reader ended
    conn._reader.join(10)
    conn._flusher.join(10)  # (a thread that still runs holds the connection)
    sockets = [conn._transport.sock, conn._turn.wake, conn._turn._wake_w]
    del conn
    gc.collect()
    assert [s.fileno() for s in sockets] == [-1, -1, -1]
