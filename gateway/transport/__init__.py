"""I/O around the core: asyncio and websockets drive :mod:`gateway.core`."""

__all__: list[str] = []
