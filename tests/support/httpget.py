"""A minimal HTTP client over a real socket, for the probe endpoints."""

from __future__ import annotations

import asyncio

__all__ = ["get"]


async def get(port: int, path: str) -> tuple[int, bytes, dict[str, str]]:
    """A minimal HTTP/1.1 GET over a real socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), body, {k.lower(): v for k, v in headers.items()}
