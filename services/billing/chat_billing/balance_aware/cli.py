"""``chat-admin balance-aware``: show or switch balance-aware turns for a user or a model.

    chat-admin balance-aware --user-id UUID                 # the user's setting, per entitled model
    chat-admin balance-aware --user-id UUID on|off|default  # default: no setting of the user's own
    chat-admin balance-aware --model-id 8 [on|off]          # for every user without a setting
"""
from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from chat_common.client import ServiceClient
from chat_common.errors import BadRequestError

COMMAND = "balance-aware"
_STATES = {"on": True, "off": False, "default": None}


def add_parser(commands: Any, user_id: Callable[[str], str]) -> None:
    parser = commands.add_parser(
        COMMAND,
        help="show or switch balance-aware turns (a short reply instead of a refusal) for a user or a model",
        description="A balance-aware turn whose balance or spending limit leaves less than the usual "
        "reservation reserves what is left and asks the AI for fewer output tokens, down to the gateway's "
        "BALANCE_AWARE_MIN_OUTPUT_TOKENS; below that it is refused as before. Off by default. A user's own "
        "setting (on/off) wins over the model's; 'default' removes it.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--user-id", type=user_id)
    target.add_argument("--model-id", type=int)
    parser.add_argument("state", nargs="?", choices=sorted(_STATES), help="omit to show the setting")


async def run(args: argparse.Namespace, client: ServiceClient, send: Callable[[str, str, Any], Awaitable[Any]]) -> Any:
    path = f"/v1/users/{args.user_id}/{COMMAND}" if args.user_id else f"/v1/models/{args.model_id}/{COMMAND}"
    if args.state is None:
        return await client.get(path)
    enabled = _STATES[args.state]
    if enabled is None and args.model_id is not None:
        raise BadRequestError("a model is on or off; 'default' is for a user")
    return await send("PUT", path, {"enabled": enabled})
