"""Sans-IO protocol code: bytes in, typed values out; no sockets, no asyncio."""
