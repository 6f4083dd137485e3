"""The key schedule: epoch keys are distinct and order-free; sealed items and HPKE boxes open only as meant."""

from __future__ import annotations

import time

import pytest

from p2psync.identity import BoxError, DeviceKeys, EpochKeys, day_number
from p2psync.identity.keys import KEY_ID_LEN, SECRET_LEN, new_secret, open_box, relay_psk, seal_box

GROUP_ID = bytes(range(16))
OTHER_GROUP = bytes(range(1, 17))
H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
S1, S2, S3 = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
EPOCH = EpochKeys.derive(GROUP_ID, [(H1, S1)])
SITE = bytes(range(50, 66))


def derived(keys: EpochKeys) -> list[bytes]:
    return [keys.key, keys.psk(), keys.tag_key(), keys.data_key()]


def flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


# --- epoch keys --------------------------------------------------------------


def test_new_secret_is_fresh_and_full_length() -> None:
    a, b = new_secret(), new_secret()
    assert len(a) == len(b) == SECRET_LEN == 32
    assert a != b


def test_derived_keys_are_distinct_and_not_the_secret() -> None:
    keys = derived(EPOCH)
    assert all(len(k) == 32 for k in keys)
    assert len(set(keys + [S1])) == 5
    assert EPOCH.epochs == (H1,)
    assert EPOCH.group_id == GROUP_ID


def test_derive_is_deterministic() -> None:
    again = EpochKeys.derive(GROUP_ID, [(H1, S1)])
    assert again == EPOCH
    assert derived(again) == derived(EPOCH)
    assert again.key_id == EPOCH.key_id


def test_derived_keys_depend_on_the_secret_and_the_group_id() -> None:
    for other in (EpochKeys.derive(GROUP_ID, [(H1, S2)]), EpochKeys.derive(OTHER_GROUP, [(H1, S1)])):
        for mine, theirs in zip(derived(EPOCH), derived(other)):
            assert mine != theirs
        assert other.key_id != EPOCH.key_id


def test_the_key_depends_on_secrets_not_on_the_event_hashes() -> None:
    # Deliberate: the found event seals its own name under epoch 0's key before its hash exists.
    relabelled = EpochKeys.derive(GROUP_ID, [(H2, S1)])
    assert relabelled.key == EPOCH.key
    assert relabelled.epochs == (H2,)


def test_several_secrets_combine_in_hash_order_not_given_order() -> None:
    ab = EpochKeys.derive(GROUP_ID, [(H1, S1), (H2, S2)])
    ba = EpochKeys.derive(GROUP_ID, [(H2, S2), (H1, S1)])
    assert ab == ba and derived(ab) == derived(ba) and ab.key_id == ba.key_id
    assert ab.epochs == ba.epochs == (H1, H2)
    # the same secrets, attached to the other events, come in the other order
    swapped = EpochKeys.derive(GROUP_ID, [(H1, S2), (H2, S1)])
    assert swapped.key != ab.key
    # a combination is neither of its parts
    assert ab.key not in (EPOCH.key, EpochKeys.derive(GROUP_ID, [(H2, S2)]).key)
    three = [EpochKeys.derive(GROUP_ID, order).key for order in (
        [(H1, S1), (H2, S2), (H3, S3)], [(H3, S3), (H1, S1), (H2, S2)], [(H2, S2), (H3, S3), (H1, S1)])]
    assert len(set(three)) == 1 and three[0] != ab.key


def test_derive_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        EpochKeys.derive(GROUP_ID, [])


def test_key_id_is_short_and_public_safe() -> None:
    kid = EPOCH.key_id
    assert len(kid) == KEY_ID_LEN == 8
    for secret in derived(EPOCH) + [S1]:
        assert kid not in secret
    assert EpochKeys.derive(GROUP_ID, [(H1, S2)]).key_id != kid
    assert EPOCH.key.hex() not in repr(EPOCH)
    assert S1.hex() not in repr(EPOCH)


def test_mdns_tag_changes_by_day_and_epoch() -> None:
    tags = {EPOCH.mdns_tag(day) for day in range(19000, 19030)}
    assert len(tags) == 30
    assert EPOCH.mdns_tag(19000) == EpochKeys.derive(GROUP_ID, [(H1, S1)]).mdns_tag(19000)
    later = EpochKeys.derive(GROUP_ID, [(H2, S2)])
    assert later.mdns_tag(19000) != EPOCH.mdns_tag(19000)
    assert EpochKeys.derive(GROUP_ID, [(H1, S1), (H2, S2)]).mdns_tag(19000) != EPOCH.mdns_tag(19000)
    assert EpochKeys.derive(OTHER_GROUP, [(H1, S1)]).mdns_tag(19000) != EPOCH.mdns_tag(19000)


def test_mdns_tag_is_short_hex_and_reveals_nothing_stable() -> None:
    tag = EPOCH.mdns_tag(19000)
    assert len(tag) == 16
    int(tag, 16)
    for stable in (GROUP_ID, S1, EPOCH.key_id, *derived(EPOCH)):
        assert stable.hex()[:8] not in tag
    EPOCH.mdns_tag(-1)  # days before 1970 still give a tag


# --- small sealed items ------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"laptop", bytes(range(256)) * 4])
def test_seal_open_round_trip(plaintext: bytes) -> None:
    blob = EPOCH.seal(plaintext, b"ad")
    assert blob.startswith(EPOCH.key_id)
    assert plaintext not in blob[KEY_ID_LEN:] or not plaintext
    assert EPOCH.open(blob, b"ad") == plaintext
    # another instance of the same epoch opens it too
    assert EpochKeys.derive(GROUP_ID, [(H1, S1)]).open(blob, b"ad") == plaintext


def test_seal_uses_a_fresh_nonce() -> None:
    assert EPOCH.seal(b"x", b"ad") != EPOCH.seal(b"x", b"ad")


def test_open_fails_under_another_epoch() -> None:
    blob = EPOCH.seal(b"secret name", b"ad")
    for other in (EpochKeys.derive(GROUP_ID, [(H2, S2)]), EpochKeys.derive(OTHER_GROUP, [(H1, S1)]),
                  EpochKeys.derive(GROUP_ID, [(H1, S1), (H2, S2)])):
        with pytest.raises(BoxError, match="another epoch"):
            other.open(blob, b"ad")


def test_open_fails_on_an_altered_blob() -> None:
    blob = EPOCH.seal(b"secret name", b"ad")
    for i in range(len(blob)):
        with pytest.raises(BoxError):
            EPOCH.open(flip(blob, i), b"ad")
    for cut in (blob[:-1], blob[: KEY_ID_LEN + 12 + 15], blob[:KEY_ID_LEN], b"", blob + b"\0"):
        with pytest.raises(BoxError):
            EPOCH.open(cut, b"ad")


def test_open_fails_with_other_associated_data() -> None:
    blob = EPOCH.seal(b"secret name", b"event 1")
    for ad in (b"event 2", b"", b"event 1\0"):
        with pytest.raises(BoxError, match="authentication"):
            EPOCH.open(blob, ad)


def test_box_error_is_a_value_error() -> None:
    assert issubclass(BoxError, ValueError)


# --- relay psk ---------------------------------------------------------------


def test_relay_psk_differs_from_the_epoch_keys() -> None:
    psk = relay_psk(GROUP_ID, S1)
    assert len(psk) == 32
    assert psk not in derived(EPOCH) and psk != S1
    assert psk == relay_psk(GROUP_ID, S1)
    assert relay_psk(GROUP_ID, S2) != psk
    assert relay_psk(OTHER_GROUP, S1) != psk


# --- HPKE boxes --------------------------------------------------------------


@pytest.fixture(scope="module")
def member() -> DeviceKeys:
    return DeviceKeys.generate()


@pytest.mark.parametrize("payload", [b"", S1, bytes(range(256)) * 8])
def test_box_round_trip(member: DeviceKeys, payload: bytes) -> None:
    box = seal_box(member.static_public, payload, GROUP_ID, SITE)
    assert payload not in box or not payload
    assert open_box(member.static_private, box, GROUP_ID, SITE) == payload


def test_boxes_are_fresh(member: DeviceKeys) -> None:
    assert seal_box(member.static_public, S1, GROUP_ID, SITE) != seal_box(member.static_public, S1, GROUP_ID, SITE)


def test_box_does_not_open_for_another_recipient(member: DeviceKeys) -> None:
    box = seal_box(member.static_public, S1, GROUP_ID, SITE)
    with pytest.raises(BoxError):
        open_box(DeviceKeys.generate().static_private, box, GROUP_ID, SITE)
    with pytest.raises(BoxError):
        open_box(member.sign_private, box, GROUP_ID, SITE)  # the wrong one of our own keys
    with pytest.raises(BoxError):
        open_box(b"short", box, GROUP_ID, SITE)


def test_altered_box_does_not_open(member: DeviceKeys) -> None:
    box = seal_box(member.static_public, S1, GROUP_ID, SITE)
    for i in range(len(box)):
        with pytest.raises(BoxError):
            open_box(member.static_private, flip(box, i), GROUP_ID, SITE)
    for cut in (box[:-1], box[:32], box[:10], b"", box + b"\0"):
        with pytest.raises(BoxError):
            open_box(member.static_private, cut, GROUP_ID, SITE)


def test_box_does_not_open_with_another_site_or_group(member: DeviceKeys) -> None:
    box = seal_box(member.static_public, S1, GROUP_ID, SITE)
    for group_id, site in ((OTHER_GROUP, SITE), (GROUP_ID, bytes(16))):
        with pytest.raises(BoxError):
            open_box(member.static_private, box, group_id, site)


# --- days --------------------------------------------------------------------


def test_day_number() -> None:
    assert day_number(0) == 0
    assert day_number(86399.9) == 0
    assert day_number(86400) == 1
    assert day_number(-1) == -1
    now = time.time()
    assert day_number(now) == int(now) // 86400
