"""Key format: prefix, length, base62 body and checksum; the hash is not the key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelmeter.gateway import auth
from modelmeter.tenancy import keys as key_format


def test_generated_keys_are_well_formed_and_unique() -> None:
    keys = {key_format.generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("mm_")
        assert len(key) == 41
        assert key_format.well_formed(key)
        assert key_format.hash_key(key) != key
        assert len(key_format.hash_key(key)) == 64


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@given(st.integers(min_value=3, max_value=40), st.sampled_from(BASE62))
def test_any_single_character_change_is_detected(position: int, replacement: str) -> None:
    key = key_format.generate_key()
    mutated = key[:position] + replacement + key[position + 1:]
    assert key_format.well_formed(mutated) == (mutated == key)


def test_parse_bearer() -> None:
    assert auth.parse_bearer("Bearer abc") == "abc"
    assert auth.parse_bearer("bearer  abc ") == "abc"
    assert auth.parse_bearer("Basic abc") is None
    assert auth.parse_bearer("Bearer ") is None
    assert auth.parse_bearer(None) is None


def test_ids_are_unique_and_forked_children_do_not_repeat_the_parent() -> None:
    import os

    from modelmeter.ids import new_id

    assert len({new_id("req") for _ in range(10_000)}) == 10_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.write(write, new_id("req").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert child[-12:] != new_id("req")[-12:]
