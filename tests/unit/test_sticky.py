"""Signed session cookies, the session-id table, Set-Cookie and the key file."""
import base64
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmdaemon.net.sticky import SessionSigner, SessionTable, load_or_create_key, set_cookie_header

KEY = bytes(range(32))
NOW = 1_700_000_000.0


def test_issued_value_verifies_to_the_backend_id():
    signer = SessionSigner(KEY)
    value = signer.issue("127.0.0.1:3001", NOW)
    assert signer.verify(value, NOW + 10, timeout=3600) == signer.backend_id("127.0.0.1:3001")
    assert signer.backend_id("127.0.0.1:3001") != signer.backend_id("127.0.0.1:3002")


def test_value_is_opaque_and_cookie_safe():
    value = SessionSigner(KEY).issue("127.0.0.1:3001", NOW)
    assert "127" not in value and "3001" not in value
    assert all(c.isalnum() or c in "-_" for c in value)


def test_stale_value_is_rejected():
    signer = SessionSigner(KEY)
    value = signer.issue("127.0.0.1:3001", NOW)
    assert signer.verify(value, NOW + 3600, timeout=3600) is not None
    assert signer.verify(value, NOW + 3601, timeout=3600) is None


def test_value_signed_with_another_key_is_rejected():
    value = SessionSigner(b"k" * 32).issue("127.0.0.1:3001", NOW)
    assert SessionSigner(KEY).verify(value, NOW, timeout=3600) is None


def test_tampering_with_any_byte_is_rejected():
    signer = SessionSigner(KEY)
    raw = bytearray(base64.urlsafe_b64decode(signer.issue("127.0.0.1:3001", NOW) + "="))
    for i in range(len(raw)):
        forged = bytearray(raw)
        forged[i] ^= 0x01
        value = base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode()
        assert signer.verify(value, NOW, timeout=3600) is None


def test_extending_the_issue_time_is_rejected():
    """A client cannot refresh a stale cookie by rewriting its timestamp."""
    signer = SessionSigner(KEY)
    raw = base64.urlsafe_b64decode(signer.issue("127.0.0.1:3001", NOW) + "=")
    forged = raw[:8] + int(NOW + 7200).to_bytes(8, "big") + raw[16:]
    value = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert signer.verify(value, NOW + 7200, timeout=3600) is None


@pytest.mark.parametrize("value", ["", "x", "=" * 43, "é" * 43, "a" * 43, "a" * 44, "!!" * 30, "\x00" * 43])
def test_garbage_is_rejected(value):
    assert SessionSigner(KEY).verify(value, NOW, timeout=3600) is None


@given(st.text(max_size=100))
def test_verify_never_raises(value):
    assert SessionSigner(KEY).verify(value, NOW, timeout=3600) is None


def test_short_key_is_refused():
    with pytest.raises(ValueError):
        SessionSigner(b"short")


def test_table_maps_session_ids_with_idle_expiry():
    table = SessionTable(timeout=10)
    table.put("abc", "127.0.0.1:3001", 0.0)
    assert table.get("abc", 9.0) == "127.0.0.1:3001"
    # The get restarted the idle timer.
    assert table.get("abc", 18.0) == "127.0.0.1:3001"
    assert table.get("abc", 28.5) is None
    assert table.get("unknown", 0.0) is None


def test_table_put_replaces():
    table = SessionTable(timeout=10)
    table.put("abc", "a:1", 0.0)
    table.put("abc", "b:1", 1.0)
    assert table.get("abc", 2.0) == "b:1"
    assert len(table) == 1


def test_table_drops_expired_entries_as_new_ones_arrive():
    table = SessionTable(timeout=10)
    for i in range(100):
        table.put(f"s{i}", "a:1", float(i) * 0.01)
    table.put("late", "a:1", 100.0)
    assert len(table) == 1


def test_table_is_bounded_least_recently_used_first():
    table = SessionTable(timeout=1000, max_entries=10)
    table.put("keep", "a:1", 0.0)
    for i in range(50):
        table.put(f"s{i}", "b:1", 1.0)
        assert table.get("keep", 1.0) == "a:1"
    assert len(table) == 10
    assert table.get("s0", 1.0) is None
    assert table.get("s49", 1.0) == "b:1"


def test_table_stores_huge_ids_by_digest():
    table = SessionTable(timeout=10)
    huge = "x" * 30000
    table.put(huge, "a:1", 0.0)
    assert table.get(huge, 1.0) == "a:1"
    assert table.get("x" * 29999, 1.0) is None
    assert all(len(k) < 100 for k in table._entries)


def test_set_cookie_header():
    assert (
        set_cookie_header("PMDAEMON_SESSION", "v", 3600, secure=False)
        == b"PMDAEMON_SESSION=v; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax"
    )
    assert set_cookie_header("S", "v", 0.5, secure=True) == b"S=v; Max-Age=1; Path=/; HttpOnly; SameSite=Lax; Secure"


def test_key_is_created_once_with_mode_0600_and_reused(tmp_path):
    home = tmp_path / "home"
    key = load_or_create_key(home)
    assert len(key) == 32
    path = home / "session.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(home) == key
    assert [p.name for p in home.iterdir()] == ["session.key"]


def test_key_file_permissions_are_tightened(tmp_path):
    key = load_or_create_key(tmp_path)
    (tmp_path / "session.key").chmod(0o644)
    assert load_or_create_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / "session.key").stat().st_mode) == 0o600


def test_truncated_key_file_is_replaced(tmp_path):
    (tmp_path / "session.key").write_bytes(b"half")
    key = load_or_create_key(tmp_path)
    assert len(key) == 32
    assert (tmp_path / "session.key").read_bytes() == key
    assert stat.S_IMODE((tmp_path / "session.key").stat().st_mode) == 0o600


def test_cookies_survive_a_restart(tmp_path):
    value = SessionSigner(load_or_create_key(tmp_path)).issue("127.0.0.1:3001", NOW)
    restarted = SessionSigner(load_or_create_key(tmp_path))
    assert restarted.verify(value, NOW + 1, 3600) == restarted.backend_id("127.0.0.1:3001")
