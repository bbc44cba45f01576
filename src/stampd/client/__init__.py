"""The requesting side of RFC 3161: build a TimeStampReq, send it over HTTP, check the reply echoes it.

Installable without the server: imports only :mod:`stampd.der`, :mod:`stampd.model` and the standard library.
"""

from stampd.client.request import build_request, check_reply, hash_file, random_nonce
from stampd.client.transport import post_request

__all__ = ["build_request", "check_reply", "hash_file", "post_request", "random_nonce"]
