"""The proxy: the aiohttp application algorithms call, the only door to the server."""
