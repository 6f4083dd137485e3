"""The control socket answers JSON lines, survives bad clients and guards its home."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from p2psync.agent.control import (
    MAX_LINE,
    AgentAlreadyRunning,
    AgentNotRunning,
    ControlError,
    request,
    serve_control,
)


async def echo(req: dict) -> dict:
    await trio.sleep(0)
    return {"ok": True, "echo": req}


def failing(req: dict) -> dict:
    raise RuntimeError("disk on fire")


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


async def read_line(stream: trio.SocketStream, buf: bytearray) -> dict | None:
    """The next JSON line from ``stream``, or None at end of stream."""
    while b"\n" not in buf:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # ECONNRESET: server closed with our bytes unread
            return None
        if not data:
            return None
        buf += data
    line, rest = bytes(buf).split(b"\n", 1)
    buf[:] = rest
    return json.loads(line)


async def ask(path: Path, req: dict) -> dict:
    return await trio.to_thread.run_sync(request, path, req)


@pytest.mark.trio
async def test_round_trip_and_socket_mode(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, echo)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert await ask(sock_path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}


@pytest.mark.trio
async def test_sync_handler_and_many_requests_per_connection(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, lambda req: {"n": req["n"] + 1})
    stream = await trio.open_unix_socket(os.fspath(sock_path))
    async with stream:
        await stream.send_all(b'{"n": 1}\n{"n": 2}\n\n{"n": 3}\n')
        buf = bytearray()
        assert [await read_line(stream, buf) for _ in range(3)] == [{"n": 2}, {"n": 3}, {"n": 4}]


@pytest.mark.trio
async def test_garbage_gets_error_and_server_keeps_serving(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, echo)
    stream = await trio.open_unix_socket(os.fspath(sock_path))
    async with stream:
        buf = bytearray()
        for garbage in [b"this is not json\n", b"[1, 2]\n", b"\xff\xfe\n", b"[" * 60000 + b"\n"]:
            await stream.send_all(garbage)
            reply = await read_line(stream, buf)
            assert reply is not None and "error" in reply, garbage[:20]
        await stream.send_all(b'{"cmd": "status"}\n')  # same connection still works
        assert await read_line(stream, buf) == {"ok": True, "echo": {"cmd": "status"}}
    assert await ask(sock_path, {"cmd": "x"}) == {"ok": True, "echo": {"cmd": "x"}}


@pytest.mark.trio
async def test_failing_handler_gets_error_reply(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, failing)
    reply = await ask(sock_path, {"cmd": "status"})
    assert "disk on fire" in reply["error"]
    assert "disk on fire" in (await ask(sock_path, {"cmd": "status"}))["error"]


@pytest.mark.trio
async def test_overlong_line_closes_only_that_client(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, echo)
    good = await trio.open_unix_socket(os.fspath(sock_path))
    bad = await trio.open_unix_socket(os.fspath(sock_path))
    async with good, bad:
        with trio.fail_after(5):
            await bad.send_all(b"x" * (MAX_LINE + 4096))
            buf = bytearray()
            reply = await read_line(bad, buf)
            assert reply is not None and "longer than" in reply["error"]
            assert await read_line(bad, buf) is None  # closed by the server
            await good.send_all(b'{"cmd": "still here"}\n')
            assert await read_line(good, bytearray()) == {"ok": True, "echo": {"cmd": "still here"}}


@pytest.mark.trio
async def test_line_of_exactly_the_limit_is_accepted(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, lambda req: {"len": len(req["pad"])})
    pad = "p" * (MAX_LINE - len('{"pad": ""}'))
    assert await ask(sock_path, {"pad": pad}) == {"len": len(pad)}


def test_not_running_message(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with pytest.raises(AgentNotRunning) as info:
        request(path, {"cmd": "status"})
    assert str(info.value) == (
        f"no agent is running for {tmp_path} (no control socket at {path}); start one with `p2psync run`"
    )


def test_not_running_when_socket_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(os.fspath(path))  # closed without unlink: a crashed agent's leftover
    with pytest.raises(AgentNotRunning, match="start one with `p2psync run`"):
        request(path, {"cmd": "status"})


@pytest.mark.trio
async def test_stale_socket_file_is_replaced(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(os.fspath(sock_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, sock_path, echo)
        assert await ask(sock_path, {"a": 1}) == {"ok": True, "echo": {"a": 1}}
        nursery.cancel_scope.cancel()
    assert not sock_path.exists()  # removed on exit


@pytest.mark.trio
async def test_second_server_on_live_socket_refuses(sock_path: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve_control, sock_path, echo)
    with pytest.raises(AgentAlreadyRunning, match="already running"):
        await serve_control(sock_path, echo)
    assert await ask(sock_path, {"a": 1}) == {"ok": True, "echo": {"a": 1}}  # first one unharmed


@pytest.mark.trio
async def test_non_socket_file_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        await serve_control(sock_path, echo)
    assert sock_path.read_text() == "precious"


def test_reply_timeout_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(os.fspath(path))
        mute.listen(1)
        with pytest.raises(ControlError, match="did not reply within 0.2 s"):
            request(path, {"cmd": "status"}, timeout=0.2)
