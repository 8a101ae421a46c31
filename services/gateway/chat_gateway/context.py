"""What the gateway's handlers share for the life of the process: the typed internal clients,
Redis and the AI channel. Built when the lifespan starts the :class:`chat_gateway.gateway.Gateway`
that holds it."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from redis.asyncio import Redis

from chat_common.aiproto.ai_service_pb2_grpc import AIServiceStub
from chat_common.client import ServiceClient
from chat_gateway.clients import BillingClient, FilesClient, SessionsClient
from chat_gateway.settings import GatewaySettings


@dataclass
class GatewayContext:
    settings: GatewaySettings
    sessions: SessionsClient
    files: FilesClient
    billing: BillingClient
    redis: Redis
    ai_channel: grpc.aio.Channel
    ai: AIServiceStub

    @classmethod
    def create(cls, settings: GatewaySettings) -> "GatewayContext":
        token = settings.service.service_token
        channel = grpc.aio.insecure_channel(
            settings.ai_target,
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        )
        return cls(
            settings=settings,
            sessions=SessionsClient(ServiceClient("sessions", settings.sessions_url, token)),
            files=FilesClient(ServiceClient("files", settings.files_url, token, timeout=60.0)),
            billing=BillingClient(ServiceClient("billing", settings.billing_url, token)),
            redis=Redis.from_url(settings.redis_url, decode_responses=False, health_check_interval=10),
            ai_channel=channel,
            ai=AIServiceStub(channel),
        )

    async def close(self) -> None:
        for client in (self.sessions, self.files, self.billing):
            await client.aclose()
        await self.redis.aclose()
        await self.ai_channel.close()
