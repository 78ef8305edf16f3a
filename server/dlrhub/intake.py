"""Every transport's way in: normalise a provider payload, then commit it.

The gRPC Ingest, the webhooks and the poller all call `Intake.ingest`, so a
report takes the same path whichever way it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from dlrhub.committer import Committer
from dlrhub.ingest import Submission
from dlrhub.normalise import Normaliser, PayloadError, Rejection


@dataclass(frozen=True, slots=True)
class Ingested:
    """What happened to a payload, once committed."""

    response: IngestResponse
    # Set when the payload as a whole was unusable (it was quarantined whole).
    rejection: Rejection | None = None


class Intake:
    def __init__(self, normaliser: Normaliser, committer: Committer, clock: Callable[[], int]) -> None:
        self._normaliser = normaliser
        self._committer = committer
        self._clock = clock

    async def ingest(self, payload: str, format: Format.ValueType, request_id: str = "") -> Ingested:
        """Normalises and commits a payload; raises StoreError if the store cannot commit."""
        received = Timestamp()
        received.FromNanoseconds(self._clock())
        try:
            submission = Submission(
                self._normaliser.normalise(payload, format, received), received, request_id
            )
        except PayloadError as error:
            submission = Submission([], received, request_id, error.rejection, payload)
        applied = await self._committer.submit(submission)
        return Ingested(applied.response, submission.payload_rejection)
