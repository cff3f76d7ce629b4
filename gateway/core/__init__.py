"""Sans-I/O core: pure logic with no asyncio, websockets, redis or prometheus_client.

A test reads the imports of every module here and fails if an I/O library appears.
"""

__all__: list[str] = []
