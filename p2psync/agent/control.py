"""The agent's local control socket: a Unix stream socket speaking JSON lines.

How this works: the agent listens on ``<home>/agent.sock`` (mode 0600, so only
its user may talk to it). A client writes one JSON object per line; for each,
the server calls ``handler(request)`` and writes the reply object as one JSON
line. A connection may carry many requests. A line that is not a JSON object
gets ``{"error": ...}`` and the connection stays open; a line longer than
64 KiB gets ``{"error": ...}`` and that connection is closed. A failing handler
gets an error reply; nothing a client sends can stop the server.

At start, an existing socket file is probed: if something accepts a connection
on it, another agent owns this home and we refuse to start; if not, the file is
a leftover from a crash and is replaced. On exit the server removes the socket
file, unless another process has replaced it meanwhile.

``request()`` is the synchronous client the CLI uses (stdlib ``socket``).
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_SUN_PATH = 107  # sizeof(sun_path) - 1 on Linux
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

Handler = Callable[[dict], "Awaitable[dict] | dict"]


class ControlError(Exception):
    """Talking to the agent over its control socket failed."""


class AgentNotRunning(ControlError):
    """No agent answers on the control socket."""


class AgentAlreadyRunning(ControlError):
    """Another live agent already owns the control socket."""


def _check_path_length(path: Path) -> None:
    n = len(os.fsencode(path))
    if n > MAX_SUN_PATH:
        raise ControlError(
            f"control socket path {path} is {n} bytes long (Unix sockets allow {MAX_SUN_PATH}); "
            "use a shorter --home"
        )


def _encode(reply: Any) -> bytes:
    """``reply`` as one JSON line; an error line if it is not a JSON-serializable object."""
    if not isinstance(reply, dict):
        reply = {"error": f"internal error: handler returned {type(reply).__name__}, not an object"}
    try:
        text = json.dumps(reply)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"error": f"internal error: reply is not JSON-serializable: {exc}"})
    return text.encode() + b"\n"


async def _answer(line: bytes, handler: Handler) -> bytes:
    """The reply line for one request line."""
    try:
        req = json.loads(line)
    except ValueError as exc:  # includes UnicodeDecodeError
        return _encode({"error": f"request is not valid JSON: {exc}"})
    except RecursionError:
        return _encode({"error": "request is nested too deeply"})
    if not isinstance(req, dict):
        return _encode({"error": f"request must be a JSON object, got {type(req).__name__}"})
    try:
        reply = handler(req)
        if inspect.isawaitable(reply):
            reply = await reply
    except Exception as exc:
        log.exception("control request %r failed", req.get("cmd"))
        reply = {"error": f"request failed: {type(exc).__name__}: {exc}"}
    return _encode(reply)


async def _serve_client(stream: trio.SocketStream, handler: Handler) -> None:
    """Answer one client's request lines until it hangs up or misbehaves."""
    buf = bytearray()
    async with stream:
        try:
            while True:
                data = await stream.receive_some(MAX_LINE)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = bytes(buf[:nl]), buf[nl + 1:]
                    if line.strip():
                        await stream.send_all(await _answer(line, handler))
                if len(buf) > MAX_LINE:
                    log.warning("control client sent a line over %d bytes; connection closed", MAX_LINE)
                    await stream.send_all(
                        _encode({"error": f"request line longer than {MAX_LINE} bytes; connection closed"})
                    )
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away mid-reply: nothing to do


async def _probe(path: Path) -> bool:
    """True if something accepts connections on the Unix socket at ``path``."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            with trio.fail_after(2):
                await sock.connect(os.fspath(path))
        except trio.TooSlowError:
            return True  # backlog full: alive but busy
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise ControlError(f"cannot check whether an agent answers on {path}: {exc.strerror}") from exc
    return True


async def _remove_stale(path: Path) -> None:
    """Delete a leftover socket file, or raise if a live agent owns it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; move it away before starting the agent")
    if await _probe(path):
        raise AgentAlreadyRunning(
            f"an agent is already running for {path.parent} (it answers on {path}); "
            "stop it first, or use another --home"
        )
    log.info("removing stale control socket %s", path)
    path.unlink(missing_ok=True)


async def serve_control(
    path: Path,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve JSON-line requests on the Unix socket ``path`` until cancelled."""
    path = Path(path)
    _check_path_length(path)
    await _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.bind(os.fspath(path))
        except OSError as exc:
            raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from exc
        inode = os.stat(path).st_ino
        try:
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            sock.listen(16)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        log.warning("control socket %s: accept failed (%s); retrying", path, exc)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(_serve_client, stream, handler)
        finally:
            try:
                if os.stat(path).st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass


def request(path: Path, req: dict, timeout: float = 5.0) -> dict:
    """Send one request to the agent at ``path`` and return its reply."""
    path = Path(path)
    _check_path_length(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise AgentNotRunning(
                f"no agent is running for {path.parent} (no control socket at {path}); "
                "start one with `p2psync run`"
            ) from None
        except ConnectionRefusedError:
            raise AgentNotRunning(
                f"no agent is running for {path.parent} (nothing answers on {path}); "
                "start one with `p2psync run`"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}; is the agent running as another user?"
            ) from None
        except TimeoutError:
            raise ControlError(f"the agent on {path} did not accept a connection within {timeout} s") from None
        return _exchange(sock, path, req, timeout)


def _exchange(sock: socket.socket, path: Path, req: dict, timeout: float) -> dict:
    line = json.dumps(req).encode() + b"\n"
    buf = bytearray()
    try:
        sock.sendall(line)
        while b"\n" not in buf:
            data = sock.recv(MAX_LINE)
            if not data:
                raise ControlError(f"the agent on {path} closed the connection without replying")
            buf += data
            if len(buf) > 64 * MAX_LINE:
                raise ControlError(f"the agent on {path} sent a reply over {64 * MAX_LINE} bytes")
    except TimeoutError:
        raise ControlError(f"the agent on {path} did not reply within {timeout} s") from None
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ControlError(f"the agent on {path} dropped the connection: {exc.strerror}") from None
    try:
        reply = json.loads(buf[: buf.index(b"\n")])
    except ValueError as exc:
        raise ControlError(f"the agent on {path} sent a reply that is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the agent on {path} sent a reply that is not a JSON object")
    return reply
