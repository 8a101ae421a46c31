"""Building multipart bodies the way browsers do, streamed or whole, and raw HTTP for the
requests an ordinary client refuses to send (a Content-Length that lies)."""
from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable

from devstack.servers import ServiceProcess, free_port
from devstack.stack import Stack

BOUNDARY = "----ChatTestBoundary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def field_part(name: str, value: str) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode() + value.encode() + b"\r\n"
    )


def file_head(filename: str, content_type: str = "application/octet-stream") -> bytes:
    # Browsers put the raw UTF-8 of the name in the quoted string.
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"".encode()
        + filename.encode()
        + f"\"\r\nContent-Type: {content_type}\r\n\r\n".encode()
    )


END = f"--{BOUNDARY}--\r\n".encode()


def form_fields(user_id: str, session_id: str = "NEW", model_name: str = "llama3.1:8b",
                session_prompt: str = "You are helpful.") -> dict[str, str]:
    return {"user_id": user_id, "session_id": session_id, "model_name": model_name, "session_prompt": session_prompt}


def body(fields: dict[str, str], filename: str | None, data: bytes, *, file_first: bool = False) -> bytes:
    before = b"".join(field_part(k, v) for k, v in fields.items())
    file = file_head(filename) + data + b"\r\n" if filename is not None else b""
    return (file + before if file_first else before + file) + END


async def streamed_body(fields: dict[str, str], filename: str, data_chunks: Iterable[bytes], *,
                        file_first: bool = False) -> AsyncIterator[bytes]:
    fields_bytes = b"".join(field_part(k, v) for k, v in fields.items())
    if not file_first:
        yield fields_bytes
    yield file_head(filename)
    for chunk in data_chunks:
        yield chunk
    yield b"\r\n"
    if file_first:
        yield fields_bytes
    yield END


def repeated(chunk: bytes, total: int) -> Iterable[bytes]:
    """``total`` bytes made of ``chunk`` repeated, without ever building them."""
    sent = 0
    while sent < total:
        piece = chunk[: total - sent]
        sent += len(piece)
        yield piece


def raw_request(port: int, head: bytes, body_parts: Iterable[bytes], *, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send bytes as they are; return the status and body of the reply. Write errors are
    ignored: a server may answer (and stop reading) before the body is all sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                if b"\r\n\r\n" in reply and _complete(reply):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    status_line, _, rest = reply.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    return status, rest.partition(b"\r\n\r\n")[2]


def _complete(reply: bytes) -> bool:
    head, _, rest = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return False


def start_pair(system: Stack, tag: str, env: dict[str, str]) -> tuple[ServiceProcess, ServiceProcess]:
    """A gateway and a files service of their own (own limits, own processes) beside the shared
    stack, using its database, bucket, sessions and billing. Stop them with ``stop_pair``."""
    files_port = free_port()
    files = system.start_service(
        "files", port=files_port, key=f"files-{tag}", env={**env, "FILES_PORT": str(files_port)}
    )
    gateway = system.start_service(
        "gateway", port=free_port(), key=f"gateway-{tag}", env={**env, "FILES_URL": f"http://127.0.0.1:{files_port}"}
    )
    return gateway, files


def stop_pair(system: Stack, tag: str) -> None:
    for key in (f"gateway-{tag}", f"files-{tag}"):
        process = system.services.pop(key, None)
        if process is not None:
            process.stop()
