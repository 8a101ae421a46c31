"""Prices of a call. The gateway sends the catalogue's prices with every request (fields 100/101);
the table below is a copy of the original catalogue (billing migration 0001) used only when a caller
sends none, as a gateway built for the original does. A model found in neither is answered at
cost 0: refusing to answer would break a client that added a model the service has never heard
of, and the gateway, which owns billing, can still refuse unpriced models itself."""
from __future__ import annotations

from dataclasses import dataclass

from chat_common.money import dollars_to_nanos, nanos_to_dollars, token_cost_nanos


@dataclass(frozen=True)
class Price:
    provider: str
    input_nanos_per_1k: int
    output_nanos_per_1k: int


def _price(provider: str, input_dollars: str, output_dollars: str) -> Price:
    return Price(provider, dollars_to_nanos(input_dollars), dollars_to_nanos(output_dollars))


BUILTIN_CATALOGUE: dict[str, Price] = {
    "gpt-3.5-turbo-0125": _price("openai", "0.0005", "0.0015"),
    "gpt-3.5-turbo": _price("openai", "0.003", "0.006"),
    "gpt-3.5-turbo-1106": _price("openai", "0.001", "0.002"),
    "gpt-3.5-turbo-instruct": _price("openai", "0.0015", "0.002"),
    "gpt-4-turbo": _price("openai", "0.01", "0.03"),
    "gpt-4-turbo-2024-04-09": _price("openai", "0.01", "0.03"),
    "gpt-4": _price("openai", "0.03", "0.06"),
    "gpt-4-32k": _price("openai", "0.06", "0.12"),
    "llama3.1:8b": _price("ollama", "0.0015", "0.002"),
}


def resolve_prices(model: str, input_nanos_per_1k: int, output_nanos_per_1k: int) -> tuple[int, int]:
    """The request's prices, or the built-in ones when the request carries none.

    Only both prices at 0 count as "not sent": a catalogue may well make one side free.
    """
    if input_nanos_per_1k or output_nanos_per_1k:
        return max(input_nanos_per_1k, 0), max(output_nanos_per_1k, 0)
    builtin = BUILTIN_CATALOGUE.get(model)
    if builtin is None:
        return 0, 0
    return builtin.input_nanos_per_1k, builtin.output_nanos_per_1k


def call_cost(
    model: str, input_tokens: int, output_tokens: int, input_nanos_per_1k: int, output_nanos_per_1k: int
) -> tuple[int, float]:
    """``(cost_nanos, cost_dollars)`` of a call."""
    in_price, out_price = resolve_prices(model, input_nanos_per_1k, output_nanos_per_1k)
    nanos = token_cost_nanos(max(input_tokens, 0), max(output_tokens, 0), in_price, out_price)
    return nanos, nanos_to_dollars(nanos)


def builtin_provider(model: str) -> str:
    """The provider the original catalogue names for ``model`` ("" when unknown)."""
    builtin = BUILTIN_CATALOGUE.get(model)
    return builtin.provider if builtin else ""
