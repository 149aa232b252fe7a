"""Who may use the console: the one-time token, sessions, hosts and form tokens."""

from __future__ import annotations

from ca.console.access import MAX_SESSIONS, Access, loopback_hosts


def test_the_token_opens_one_session_once() -> None:
    access = Access(token="t0ken", hosts=loopback_hosts(8282))
    assert access.exchange("wrong") is None and not access.token_spent
    session = access.exchange("t0ken")
    assert session is not None and access.session_valid(session)
    assert access.token_spent and access.exchange("t0ken") is None
    assert not access.session_valid("made-up") and not access.session_valid(None)


def test_only_the_consoles_own_loopback_host_is_answered() -> None:
    access = Access(token="t", hosts=loopback_hosts(8282))
    assert access.host_allowed("127.0.0.1:8282") and access.host_allowed("LOCALHOST:8282")
    assert not access.host_allowed("evil.example:8282") and not access.host_allowed(None)
    assert Access(token=None).host_allowed("anything")  # mTLS: the handshake decides


def test_form_tokens_are_bound_to_their_session() -> None:
    access = Access(token="t")
    session = access.exchange("t")
    assert session is not None
    form = access.form_token(session)
    assert access.form_token_valid(session, form)
    assert not access.form_token_valid("another", form)
    assert not access.form_token_valid(session, "")


def test_sessions_are_bounded() -> None:
    access = Access(token=None)
    sessions = []
    for _ in range(MAX_SESSIONS + 1):
        access._token = Access.new_token()  # as if the command printed a new one
        sessions.append(access.exchange(access._token))
    assert not access.session_valid(sessions[0])
    assert all(access.session_valid(s) for s in sessions[1:])
