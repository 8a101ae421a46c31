"""Small pure pieces of the turn."""
from __future__ import annotations

from chat_common.aiproto import ai_service_pb2 as pb
from chat_gateway.chat.context_cache import Entry
from chat_gateway.chat.turn import _cost_nanos, estimate_tokens, history_json, last


def test_last_n() -> None:
    items = list(range(6))
    assert last(items, 10) == items  # fewer than n: all of them, not a negative slice
    assert last(items, 4) == [2, 3, 4, 5]
    assert last(items, 0) == []  # items[-0:] would be everything
    assert last([], 3) == []


def test_history_is_a_json_array_of_role_and_content() -> None:
    text = history_json([Entry("user", 'say "hi"\n'), Entry("file", "a.png")])
    assert text == '[{"role":"user","content":"say \\"hi\\"\\n"},{"role":"file","content":"a.png"}]'
    assert history_json([]) == "[]"


def test_token_estimate_is_a_quarter_of_the_characters() -> None:
    assert estimate_tokens("a" * 400, "b" * 400) == 200
    assert estimate_tokens("") == 1  # never zero: billing prices at least something


def test_cost_prefers_exact_nanos() -> None:
    assert _cost_nanos(pb.Response(cost=0.5, cost_nanos=123)) == 123
    # float32 dollars from an original AI service: converted to the nearest nano-dollar
    assert _cost_nanos(pb.Response(cost=0.0015)) == 1_500_000
    assert _cost_nanos(pb.Response()) == 0
