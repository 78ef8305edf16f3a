"""Regression tests for bugs a review found: each once answered wrongly or stalled."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from deliveryreport.v1.delivery_report_service_pb2 import (
    FetchRequest,
    Format,
    IngestOutcome,
    IngestRequest,
    RenormaliseQuarantineRequest,
)
from dlrhub import app
from dlrhub.config import Settings
from tests.conftest import Running
from tests.normalising import NORMALISER, RECEIVED


async def invalid_argument_reason(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


async def test_a_deeply_nested_page_token_is_invalid_argument(server: Running) -> None:
    token = base64.urlsafe_b64encode(b"[" * 200_000).decode().rstrip("=")
    reason = await invalid_argument_reason(server.stub.Fetch(FetchRequest(bulk_id="b", page_token=token)))
    assert reason == "INVALID_PAGE_TOKEN"


async def test_too_many_renormalise_ids_is_invalid_argument(server: Running) -> None:
    request = RenormaliseQuarantineRequest(ids=range(1, 10_002))
    assert await invalid_argument_reason(server.stub.RenormaliseQuarantine(request)) == "TOO_MANY_IDS"


async def test_a_rejected_gms_batch_item_stays_rejected_when_re_run_unchanged(server: Running) -> None:
    payload = '[{"message_id": "ok", "status": 2}, [{"message_id": "nested", "status": 2}]]'
    answer = await server.stub.Ingest(IngestRequest(payload=payload))
    assert [r.outcome for r in answer.results] == [
        IngestOutcome.INGEST_OUTCOME_ACCEPTED,
        IngestOutcome.INGEST_OUTCOME_REJECTED,
    ]
    rerun = await server.stub.RenormaliseQuarantine(RenormaliseQuarantineRequest())
    assert (rerun.resolved_count, rerun.still_rejected_count) == (0, 1)
    assert rerun.results[0].results[0].error.reason == "WRONG_TYPE"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Fetch(FetchRequest(message_id="nested"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_poll_limit_over_the_batch_limit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        db=tmp_path / "x.db",
        poll_base_url="http://127.0.0.1:1",
        poll_api_key="key",
        poll_limit=1000,
        max_batch_items=500,
    )
    with pytest.raises(ValueError, match="DLRHUB_POLL_LIMIT"):
        await app.start(settings)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("price", ["1_000", "١٢", "0x10", " ", "1e", "."])
def test_a_price_that_is_not_a_plain_decimal_is_rejected(price: str) -> None:
    body = {
        "results": [
            {"messageId": "p", "status": {"groupId": 3, "id": 5}, "price": {"pricePerMessage": price}}
        ]
    }
    [item] = NORMALISER.normalise(json.dumps(body), Format.FORMAT_UNSPECIFIED, RECEIVED)
    assert item.rejection is not None
    assert (item.rejection.field, item.rejection.reason) == ("results[0].price.pricePerMessage", "WRONG_TYPE")


@pytest.mark.parametrize("price", ["0.0075", "-1", "1.5E-3", "10", ".5"])
def test_a_plain_decimal_price_string_is_kept_as_given(price: str) -> None:
    body = {
        "results": [
            {"messageId": "p", "status": {"groupId": 3, "id": 5}, "price": {"pricePerMessage": price}}
        ]
    }
    [item] = NORMALISER.normalise(json.dumps(body), Format.FORMAT_UNSPECIFIED, RECEIVED)
    assert item.report is not None
    assert item.report.price.amount == price
