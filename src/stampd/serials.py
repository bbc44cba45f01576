"""Serial numbers unique by construction, with no coordination between processes or nodes (SPEC TST-04)."""

from __future__ import annotations

import os

SERIAL_BITS = 127
"""Random bits per serial: collisions are negligible (birthday bound 2**63 tokens) and the encoding stays at
16 content octets, far below the 160-bit limit of RFC 3161 §2.4.2 (SPEC TST-05). The record store's unique key
catches the impossible anyway."""


class RandomSerialSource:
    def next_serial(self) -> int:
        while True:
            serial = int.from_bytes(os.urandom(16), "big") >> (128 - SERIAL_BITS)
            if serial:
                return serial
