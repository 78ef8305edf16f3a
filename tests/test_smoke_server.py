from __future__ import annotations

import pytest

from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestOutcome, IngestRequest
from tests.conftest import Running

# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines


async def test_ingest_then_fetch(server: Running) -> None:
    payload = (
        '{"message_id": "m-1", "status": 2, "substatus": 23, "hyber_status": 23011, "time": 1477417294667}'
    )
    response = await server.stub.Ingest(IngestRequest(payload=payload))
    assert [r.outcome for r in response.results] == [IngestOutcome.INGEST_OUTCOME_ACCEPTED]
    fetched = await server.stub.GetMessage(GetMessageRequest(message_id="m-1"))
    assert fetched.messages[0].raw_payload == payload
    assert fetched.messages[0].received_time.ToNanoseconds() == server.clock.now_ns
