"""NoiseStream over in-memory streams and real TCP: trio's generic stream checks plus failures."""

import os

import pytest
import trio
import trio.testing

from p2psync.net.noise_stream import HandshakeFailed, NoiseStream
from p2psync.noise import agent_handshake, agent_responder
from p2psync.noise.dh import generate_private

GROUP = os.urandom(32)
PROLOGUE = b"p2psync test"


def pair_over(left, right, *, key_a=GROUP, key_b=GROUP):
    a = NoiseStream(left, agent_handshake(True, generate_private(), key_a, PROLOGUE))
    b = NoiseStream(right, agent_handshake(False, generate_private(), key_b, PROLOGUE))
    return a, b


async def handshaken(a, b):
    async with trio.open_nursery() as n:
        n.start_soon(a.do_handshake)
        n.start_soon(b.do_handshake)
    return a, b


async def memory_noise_pair():
    left, right = trio.testing.memory_stream_pair()
    return await handshaken(*pair_over(left, right))


async def multi_psk_noise_pair():
    left, right = trio.testing.memory_stream_pair()
    a = NoiseStream(left, agent_handshake(True, generate_private(), GROUP, PROLOGUE))
    psks = [os.urandom(32), GROUP, os.urandom(32)]
    b = NoiseStream(right, agent_responder(generate_private(), psks, PROLOGUE))
    return await handshaken(a, b)


async def lockstep_noise_pair():
    left, right = trio.testing.lockstep_stream_pair()
    return await handshaken(*pair_over(left, right))


@pytest.mark.trio
async def test_generic_two_way_stream_memory():
    await trio.testing.check_two_way_stream(memory_noise_pair, None)


@pytest.mark.trio
async def test_generic_two_way_stream_lockstep():
    await trio.testing.check_two_way_stream(lockstep_noise_pair, lockstep_noise_pair)


@pytest.mark.trio
async def test_generic_two_way_stream_multi_psk_responder():
    await trio.testing.check_two_way_stream(multi_psk_noise_pair, None)


@pytest.mark.trio
async def test_large_transfer_over_tcp_roundtrips():
    payload = os.urandom(3 * 1024 * 1024 + 17)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    got = bytearray()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        conn = await listeners[0].accept()
        s = NoiseStream(conn, agent_handshake(False, generate_private(), GROUP, PROLOGUE))
        while chunk := await s.receive_some():
            got.extend(chunk)
        await s.aclose()

    async with trio.open_nursery() as n:
        await n.start(serve)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        c = NoiseStream(tcp, agent_handshake(True, generate_private(), GROUP, PROLOGUE))
        await c.send_all(payload)
        await c.aclose()
    await listeners[0].aclose()
    assert bytes(got) == payload


@pytest.mark.trio
async def test_wrong_group_key_fails_handshake_on_both_sides():
    left, right = trio.testing.memory_stream_pair()
    a, b = pair_over(left, right, key_b=os.urandom(32))
    results = {}

    async def run(name, s):
        try:
            await s.do_handshake()
            results[name] = "ok"
        except trio.BrokenResourceError as e:
            results[name] = e
            await s.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(run, "a", a)
        n.start_soon(run, "b", b)
    assert isinstance(results["b"], HandshakeFailed)
    assert isinstance(results["a"], trio.BrokenResourceError)
    assert b.remote_static is None and a.remote_static is None


@pytest.mark.trio
async def test_tampered_transport_message_breaks_stream():
    left, right = trio.testing.memory_stream_pair()
    a, b = await handshaken(*pair_over(left, right))
    # Flip one ciphertext bit in flight by writing a forged frame on the raw stream.
    await a.send_all(b"hello")
    assert await b.receive_some() == b"hello"
    forged = bytearray(a._noise.encrypt(b"evil"))
    forged[3] ^= 1
    await left.send_all(len(forged).to_bytes(2, "big") + bytes(forged))
    with pytest.raises(trio.BrokenResourceError, match="failed authentication"):
        await b.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await b.receive_some()


@pytest.mark.trio
async def test_eof_mid_frame_is_an_error_not_data():
    left, right = trio.testing.memory_stream_pair()
    a, b = await handshaken(*pair_over(left, right))
    await left.send_all(b"\x00\x40abc")  # claims 64 bytes, sends 3
    await left.aclose()
    with pytest.raises(trio.BrokenResourceError, match="middle of a message"):
        await b.receive_some()


@pytest.mark.trio
async def test_multi_psk_responder_over_memory_streams():
    epochs = [os.urandom(32) for _ in range(3)]
    for used in (2, 0):
        left, right = trio.testing.memory_stream_pair()
        initiator = agent_handshake(True, generate_private(), epochs[used], PROLOGUE)
        a = NoiseStream(left, initiator)
        b = NoiseStream(right, agent_responder(generate_private(), epochs, PROLOGUE))
        assert b.psk_index is None and b.handshake_hash is None
        await handshaken(a, b)
        assert b.psk_index == used and a.psk_index is None
        assert a.handshake_hash == b.handshake_hash
        assert b.remote_static == initiator.local_static
        await a.send_all(b"over epoch %d" % used)
        assert await b.receive_some() == b"over epoch %d" % used
        await b.send_all(b"ack")
        assert await a.receive_some() == b"ack"


@pytest.mark.trio
async def test_multi_psk_responder_refuses_unknown_psk_over_memory_streams():
    left, right = trio.testing.memory_stream_pair()
    a = NoiseStream(left, agent_handshake(True, generate_private(), os.urandom(32), PROLOGUE))
    b = NoiseStream(right, agent_responder(generate_private(), [GROUP, os.urandom(32)], PROLOGUE))
    failures = {}

    async def run(name, s):
        try:
            await s.do_handshake()
        except trio.BrokenResourceError as e:
            failures[name] = e
            await s.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(run, "a", a)
        n.start_soon(run, "b", b)
    assert isinstance(failures["b"], HandshakeFailed)
    assert "no known pre-shared key" in str(failures["b"])
    assert isinstance(failures["a"], trio.BrokenResourceError)
    assert b.psk_index is None and b.remote_static is None
