"""The core of the TSA: a decoded request and the ports in, a recorded token or a rejection out.

No I/O of its own: the clock, signer, serial source and record sink arrive as arguments, so every decision here is
testable with injected fakes, and no token leaves before its record is durable (RFC 3628 §7.4.8, SPEC OPS-09).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from stampd.der.request import encode_message_imprint
from stampd.der.response import rejection
from stampd.der.token import GenTimeFormatter, TokenFields, TokenTemplate
from stampd.errors import Rejection, SigningError, StampdError, SystemFailure
from stampd.model import IssuedToken, Reply, TimeStampRequest, TokenRecord
from stampd.policy import IssuancePolicy
from stampd.ports import Clock, RecordSink, SerialSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key and certificate of a TSU, as its tokens are assembled, and the genTimes it may sign.

    The window is the certificate's validity narrowed by its privateKeyUsagePeriod: a token outside it would fail
    every verifier that checks the chain at genTime (SPEC CRT-06, OPS-05, INT-11).
    """

    template: TokenTemplate
    not_before_ns: int
    not_after_ns: int
    certificate_serial: int


class TimeStampingUnit:
    """One TSU: one key, one certificate, one policy set (RFC 3628 §4.3).

    A ``successor`` key takes over at its activation instant: the genTime of each token decides which key signs
    it, so there is never a gap and never two keys at once (rollover); ``on_activate`` hears of the switch once.
    """

    def __init__(
        self,
        *,
        name: str,
        policy: IssuancePolicy,
        key: SigningKey,
        gen_time: GenTimeFormatter,
        clock: Clock,
        serials: SerialSource,
        records: RecordSink,
        successor: tuple[int, SigningKey] | None = None,
        on_activate: Callable[[str, SigningKey], None] = lambda _name, _key: None,
    ) -> None:
        self.name = name
        self._key = key
        self._successor = successor
        self._on_activate = on_activate
        self.stopped: str | None = None
        self.policy = policy
        self._gen_time = gen_time
        self._clock = clock
        self._serials = serials
        self._records = records

    def key_at(self, gen_time_ns: int) -> SigningKey:
        """The key that signs a token dated ``gen_time_ns``: the successor from its activation instant on.

        Pure: observers (/readyz, metrics) may ask for any instant; only issuance moves the TSU to its successor.
        """
        successor = self._successor
        if successor is not None and gen_time_ns >= successor[0]:
            return successor[1]
        return self._key

    def _signing_key(self, gen_time_ns: int) -> SigningKey:
        key = self.key_at(gen_time_ns)
        if key is not self._key:
            self._key, self._successor = key, None
            self._on_activate(self.name, key)
        return key

    def stop(self, state: str) -> None:
        """Refuse every request from now on (compromise or termination, SPEC OPS-10, OPS-11); permanent."""
        self.stopped = state

    def issue(self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None) -> IssuedToken:
        """Sign a token for ``request``; raises a :class:`Rejection` naming the one failure bit."""
        if self.stopped is not None:
            raise SigningError(f"TSU {self.name} is {self.stopped}")
        policy = self.policy.policy_for(request)
        now_ns = self._gen_time.truncate(self._clock.now_ns())
        key = self._signing_key(now_ns)
        if not key.not_before_ns <= now_ns <= key.not_after_ns:
            raise SigningError("the TSU key may not sign now (certificate validity or privateKeyUsagePeriod)")
        gen_time = self._gen_time.text(now_ns)
        serial = self._serials.next_serial()
        fields = TokenFields(
            policy=policy,
            message_imprint=encode_message_imprint(request.imprint),
            serial=serial,
            gen_time=self._gen_time.encode(now_ns),
            nonce=request.nonce,
        )
        try:
            response = key.template.response(fields, with_certificates=request.cert_req)
        except StampdError:
            raise
        except Exception as e:
            raise SigningError(f"signing failed: {type(e).__name__}") from e
        record = TokenRecord(
            serial=serial,
            gen_time_ns=now_ns,
            gen_time=gen_time,
            tsu=self.name,
            policy=policy,
            hash_oid=request.imprint.hash_oid,
            imprint=request.imprint.digest,
            nonce=request.nonce,
            token=response,
            requester=requester,
            subscriber=subscriber,
        )
        return IssuedToken(record=record, response=response)

    async def respond(self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None) -> Reply:
        """The DER TimeStampResp for ``request``: a recorded token, or a rejection (SPEC STS-01..06)."""
        try:
            issued = self.issue(request, requester, subscriber)
            await self._records.record(issued.record)
        except SystemFailure as e:
            log.error("TSU %s: no token issued: %s", self.name, e, exc_info=e.__cause__ is not None)
            return Reply(rejection(e.fail_info, "the TSA could not issue a token; try again later"), e.fail_info)
        except Rejection as e:
            return Reply(rejection(e.fail_info, str(e)), e.fail_info)
        return Reply(issued.response)


class StoppedUnit:
    """A compromised or terminated TSU: it holds no key and answers every request with systemFailure, so that its
    state survives restarts even after its key was destroyed (SPEC OPS-10, OPS-11)."""

    def __init__(self, name: str, state: str) -> None:
        self.name = name
        self.stopped = state

    async def respond(self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None) -> Reply:
        fail_info = SystemFailure.fail_info
        return Reply(rejection(fail_info, "the TSA could not issue a token; try again later"), fail_info)
