"""Rejection replies (RFC 3161 §2.4.2): status rejection(2), a statusString and exactly one failInfo bit."""

from __future__ import annotations

from functools import lru_cache

from stampd.der.encoding import integer, named_bit_list, sequence, utf8_string
from stampd.errors import FailureInfo

REJECTION = 2


@lru_cache(maxsize=64)
def rejection(fail_info: FailureInfo, text: str) -> bytes:
    """TimeStampResp with PKIStatusInfo {rejection, PKIFreeText, failInfo} and no token.

    SPEC STS-01, STS-04, STS-07.
    """
    status = sequence(integer(REJECTION), sequence(utf8_string(text)), named_bit_list(int(fail_info)))
    return sequence(status)
