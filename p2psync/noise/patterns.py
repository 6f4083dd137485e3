"""Handshake patterns (Noise §7) and protocol names (§8), read from a table.

How this works: ``_TABLE`` holds every one-way, fundamental and deferred
pattern of revision 34 in the spec's own notation, one pattern per line:
``->`` starts a message from the initiator, ``<-`` one from the responder,
and ``...`` ends the pre-messages (public keys known before the handshake).
The table is parsed once at import. A protocol name such as
``Noise_XXpsk0+psk2_25519_ChaChaPoly_BLAKE2s`` is split into its pattern, its
modifiers and the three crypto names. Modifier ``psk0`` puts a ``psk`` token at
the start of the first message; ``pskN`` (N >= 1) puts one at the end of
message N (§9.4). The PSK validity rule of §9.3 is checked on the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import HandshakeError

_TABLE = """
N:     <- s ...  -> e, es
K:     -> s  <- s ...  -> e, es, ss
X:     <- s ...  -> e, es, s, ss
NN:    -> e  <- e, ee
NK:    <- s ...  -> e, es  <- e, ee
NX:    -> e  <- e, ee, s, es
KN:    -> s ...  -> e  <- e, ee, se
KK:    -> s  <- s ...  -> e, es, ss  <- e, ee, se
KX:    -> s ...  -> e  <- e, ee, se, s, es
XN:    -> e  <- e, ee  -> s, se
XK:    <- s ...  -> e, es  <- e, ee  -> s, se
XX:    -> e  <- e, ee, s, es  -> s, se
IN:    -> e, s  <- e, ee, se
IK:    <- s ...  -> e, es, s, ss  <- e, ee, se
IX:    -> e, s  <- e, ee, se, s, es
NK1:   <- s ...  -> e  <- e, ee, es
NX1:   -> e  <- e, ee, s  -> es
X1N:   -> e  <- e, ee  -> s  <- se
X1K:   <- s ...  -> e, es  <- e, ee  -> s  <- se
XK1:   <- s ...  -> e  <- e, ee, es  -> s, se
X1K1:  <- s ...  -> e  <- e, ee, es  -> s  <- se
X1X:   -> e  <- e, ee, s, es  -> s  <- se
XX1:   -> e  <- e, ee, s  -> es, s, se
X1X1:  -> e  <- e, ee, s  -> es, s  <- se
K1N:   -> s ...  -> e  <- e, ee  -> se
K1K:   -> s  <- s ...  -> e, es  <- e, ee  -> se
KK1:   -> s  <- s ...  -> e  <- e, ee, se, es
K1K1:  -> s  <- s ...  -> e  <- e, ee, es  -> se
K1X:   -> s ...  -> e  <- e, ee, s, es  -> se
KX1:   -> s ...  -> e  <- e, ee, se, s  -> es
K1X1:  -> s ...  -> e  <- e, ee, s  -> se, es
I1N:   -> e, s  <- e, ee  -> se
I1K:   <- s ...  -> e, es, s  <- e, ee  -> se
IK1:   <- s ...  -> e, s  <- e, ee, se, es
I1K1:  <- s ...  -> e, s  <- e, ee, es  -> se
I1X:   -> e, s  <- e, ee, s, es  -> se
IX1:   -> e, s  <- e, ee, se, s  -> es
I1X1:  -> e, s  <- e, ee, s  -> se, es
"""

ONE_WAY = frozenset({"N", "K", "X"})
MESSAGE_TOKENS = frozenset({"e", "s", "ee", "es", "se", "ss", "psk"})


@dataclass(frozen=True)
class HandshakePattern:
    """A pattern: pre-message keys per side and the tokens of each message.

    Message ``i`` is sent by the initiator when ``i`` is even, by the
    responder when it is odd.
    """

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def has_psk(self) -> bool:
        """True if any message carries a ``psk`` token."""
        return any("psk" in m for m in self.messages)

    @property
    def psk_count(self) -> int:
        """How many pre-shared keys the handshake consumes."""
        return sum(m.count("psk") for m in self.messages)

    def sent_by(self, initiator: bool) -> list[tuple[str, ...]]:
        """The message patterns this side sends."""
        return [m for i, m in enumerate(self.messages) if (i % 2 == 0) == initiator]


@dataclass(frozen=True)
class ProtocolName:
    """A parsed ``Noise_<pattern>_<dh>_<cipher>_<hash>`` name."""

    name: str
    pattern: HandshakePattern
    dh: str
    cipher: str
    hash: str


def _parse_line(line: str) -> HandshakePattern:
    name, _, body = line.partition(":")
    pre_text, dots, msg_text = body.partition("...")
    if not dots:
        pre_text, msg_text = "", body
    pre = {"->": (), "<-": ()}
    for arrow, tokens in _segments(pre_text):
        pre[arrow] = tokens
    segments = _segments(msg_text)
    for i, (arrow, _tokens) in enumerate(segments):
        if arrow != ("->" if i % 2 == 0 else "<-"):
            raise AssertionError(f"pattern {name}: message {i + 1} breaks alternation")
    return HandshakePattern(
        name.strip(), pre["->"], pre["<-"], tuple(t for _, t in segments)
    )


def _segments(text: str) -> list[tuple[str, tuple[str, ...]]]:
    parts = re.split(r"(->|<-)", text)
    return [
        (arrow, tuple(t.strip() for t in tokens.split(",")))
        for arrow, tokens in zip(parts[1::2], parts[2::2])
    ]


PATTERNS: dict[str, HandshakePattern] = {
    p.name: p for p in map(_parse_line, filter(None, _TABLE.strip().splitlines()))
}


def _apply_psk(pattern: HandshakePattern, modifiers: list[str]) -> HandshakePattern:
    messages = [list(m) for m in pattern.messages]
    seen: set[int] = set()
    for modifier in modifiers:
        match = re.fullmatch(r"psk(\d+)", modifier)
        if match is None:
            raise HandshakeError(f"unsupported modifier {modifier!r} (only pskN)")
        n = int(match.group(1))
        if n in seen:
            raise HandshakeError(f"modifier {modifier!r} appears twice")
        if n > len(messages):
            raise HandshakeError(
                f"modifier {modifier!r} needs {n} messages; "
                f"pattern {pattern.name} has {len(messages)}"
            )
        seen.add(n)
        if n == 0:
            messages[0].insert(0, "psk")
        else:
            messages[n - 1].append("psk")
    name = pattern.name + "+".join(modifiers)
    result = HandshakePattern(
        name, pattern.initiator_pre, pattern.responder_pre, tuple(map(tuple, messages))
    )
    _check_psk_validity(result)
    return result


def _check_psk_validity(pattern: HandshakePattern) -> None:
    """Refuse patterns that encrypt under a PSK before sending ``e`` (§9.3)."""
    sent_e = [False, False]
    psk_seen = False
    for i, tokens in enumerate(pattern.messages):
        side = i % 2
        for token in (*tokens, "payload"):
            if token == "e":
                sent_e[side] = True
            elif token == "psk":
                psk_seen = True
            elif token in ("s", "payload") and psk_seen and not sent_e[side]:
                raise HandshakeError(
                    f"pattern {pattern.name} breaks the PSK validity rule: message "
                    f"{i + 1} encrypts before its sender has sent an ephemeral key"
                )


def parse_protocol_name(name: str) -> ProtocolName:
    """The pattern and crypto names in ``name``; HandshakeError if malformed."""
    parts = name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise HandshakeError(
            f"protocol name {name!r} is not of the form "
            "Noise_<pattern>_<dh>_<cipher>_<hash>"
        )
    match = re.fullmatch(r"([A-Z][A-Z0-9]*)([a-z][a-z0-9+]*)?", parts[1])
    if match is None or match.group(1) not in PATTERNS:
        raise HandshakeError(f"unknown handshake pattern {parts[1]!r} in {name!r}")
    pattern = PATTERNS[match.group(1)]
    if match.group(2):
        pattern = _apply_psk(pattern, match.group(2).split("+"))
    return ProtocolName(name, pattern, parts[2], parts[3], parts[4])
