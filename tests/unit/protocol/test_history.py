"""The signed history's rules, as a verifier holds a coordinator to them: every signature, every link, every
version applied to the current one, rollbacks only to an earlier live version, and a record verified once
never different later."""

from __future__ import annotations

import pytest

from protocol.errors import HistoryError
from protocol.history import Chain, SignedRecord, VersionRecord, sign, sign_record, verify
from protocol.signing import generate_key, public_key_hex

KEY = generate_key()
H = [f"{i:064x}" for i in range(10)]  # parameter hashes
U = [f"{i + 100:064x}" for i in range(10)]  # update digests


def link(last: SignedRecord | None, key=KEY, **fields: object) -> SignedRecord:  # type: ignore[no-untyped-def]
    seq, previous = (0, None) if last is None else (last.record.seq + 1, last.digest)
    record = VersionRecord.model_validate(
        {"seq": seq, "previous": previous, "run_id": "r", "at": 1.0, **fields}
    )
    return sign_record(key, record)


def version(last: SignedRecord | None, v: int, base: int | None, **extra: object) -> SignedRecord:
    if base is None:
        return link(last, kind="version", version=v, param_hash=H[v], **extra)
    fields = {
        "kind": "version",
        "version": v,
        "base_version": base,
        "param_hash": H[v],
        "update_sha256": U[v],
    }
    return link(last, **{**fields, **extra})


def history() -> list[SignedRecord]:
    """Versions 0, 1, 2, a rollback to 1, then version 3 on 1."""
    out = [version(None, 0, None)]
    out.append(version(out[-1], 1, 0))
    out.append(version(out[-1], 2, 1))
    out.append(link(out[-1], kind="rollback", version=1, param_hash=H[1], rolled_back=[2]))
    out.append(version(out[-1], 3, 1))
    return out


def chain() -> Chain:
    return Chain(public_key_hex(KEY), "r")


def test_a_history_with_a_rollback_verifies_and_says_what_each_version_is() -> None:
    c = chain()
    c.extend(history())
    assert c.head == 3 and c.seq == 4 and c.set_aside == {2}
    known = c.known(3)
    assert known is not None and known.base_version == 1 and known.update_sha256 == U[3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h[:2] + h[3:], "expected record 2 next"),  # one left out
        (lambda h: [h[0], h[2], h[1]], "expected record 1 next"),  # reordered
        (lambda h: [h[0], h[1], version(h[0], 2, 1)], "expected record 2 next"),  # linked to another
        (lambda h: [h[0], h[1].model_copy(update={"signature": h[2].signature})], "signature does not"),
        (lambda h: [h[0], version(h[0], 1, 0, key=generate_key())], "signature does not"),
        (lambda h: [h[0], version(h[0], 1, 0, run_id="other")], "belongs to run 'other'"),
        (lambda h: [h[0], version(h[0], 2, 0), version(None, 0, None)], "expected record 2 next"),
    ],
)
def test_a_changed_missing_or_reordered_record_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HistoryError, match=message):
        chain().extend(change(history()))


def test_a_forged_link_is_refused_even_with_a_valid_signature() -> None:
    h = history()
    forged = sign_record(KEY, h[2].record.model_copy(update={"previous": "0" * 64}))
    with pytest.raises(HistoryError, match="does not link"):
        chain().extend([h[0], h[1], forged])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda h: version(h[1], 3, 0), "applies to version 0, not the current version 1"),
        (lambda h: version(h[1], 1, 1), "a version number used before"),
        (lambda h: version(h[1], 2, 1, update_sha256=None), "without a published update"),
        (lambda h: link(h[1], kind="rollback", version=1, param_hash=H[1]), "not an earlier live one"),
        (
            lambda h: link(h[1], kind="rollback", version=0, param_hash=H[5], rolled_back=[1]),
            "another parameter",
        ),
        (lambda h: link(h[1], kind="rollback", version=0, param_hash=H[0]), "not the later versions"),
    ],
)
def test_a_record_that_breaks_the_rules_of_a_history_is_refused(build, message) -> None:  # type: ignore[no-untyped-def]
    h = history()[:2]
    with pytest.raises(HistoryError, match=message):
        chain().extend([*h, build(h)])


def test_a_record_verified_before_cannot_come_back_different() -> None:
    h = history()
    c = chain()
    c.expect = {2: h[2].digest}
    c.extend(h)  # the same history: fine
    rewritten = [h[0], h[1], version(h[1], 2, 1, at=2.0)]
    c = chain()
    c.expect = {2: h[2].digest}
    with pytest.raises(HistoryError, match="the history was rewritten"):
        c.extend(rewritten)


def test_answers_are_signed_per_domain() -> None:
    pub = public_key_hex(KEY)
    fields = {"round": 3, "version": 2}
    signature = sign(KEY, "round", fields)
    verify(pub, "round", fields, signature)
    with pytest.raises(HistoryError, match="round answer does not verify"):
        verify(pub, "round", {**fields, "round": 4}, signature)
    with pytest.raises(HistoryError, match="info answer does not verify"):
        verify(pub, "info", fields, signature)  # a round's signature is no info's
    with pytest.raises(HistoryError, match="is not signed"):
        verify(pub, "data", fields, None)
