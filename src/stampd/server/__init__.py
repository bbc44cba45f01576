"""The HTTP transport (RFC 3161 §3.4): an ASGI application served by uvicorn."""
