"""The content-addressed parse memo: a changed reply is a new key, and the memo is bounded."""

from __future__ import annotations

from services.gateway.memo import ParseMemo


def test_memo_reuses_same_reply_and_reparses_a_changed_one() -> None:
    calls: list[tuple[bytes, ...]] = []
    memo: ParseMemo[int] = ParseMemo("test", 2)

    def parse(raw: tuple[bytes, ...]) -> int:
        calls.append(raw)
        return len(raw)

    a = (b"sku-1", b"0.5")
    assert memo.get(a, lambda: parse(a)) == 2
    assert memo.get((b"sku-1", b"0.5"), lambda: parse(a)) == 2  # equal bytes, fresh objects: a hit
    b = (b"sku-1", b"0.7")
    assert memo.get(b, lambda: parse(b)) == 2
    assert calls == [a, b]


def test_memo_is_bounded_lru_and_can_be_off() -> None:
    memo: ParseMemo[str] = ParseMemo("test-lru", 2)
    memo.get("a", lambda: "A")
    memo.get("b", lambda: "B")
    memo.get("a", lambda: "x")  # a is now the most recent
    memo.get("c", lambda: "C")  # evicts b
    assert len(memo) == 2
    assert memo.get("b", lambda: "B2") == "B2"
    off: ParseMemo[str] = ParseMemo("test-off", 0)
    assert off.get("a", lambda: "1") == "1"
    assert off.get("a", lambda: "2") == "2"
    assert len(off) == 0
