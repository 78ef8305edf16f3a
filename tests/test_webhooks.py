"""The webhook endpoints over real HTTP: POST /webhooks/gms and /webhooks/sent-sms-report."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
    RenormaliseQuarantineRequest,
)
from dlrhub import app
from dlrhub.config import Settings
from tests.conftest import FIXTURES, SEEDS, FakeClock, Running
from tests.helpers import ssr, ssr_payload

GMS = "/webhooks/gms"
SMS = "/webhooks/sent-sms-report"
GMS_BATCH = json.loads((FIXTURES / "gms_batch.json").read_text())
BATCH_IDS = [item["message_id"] for item in GMS_BATCH]


def gms_report(message_id: str) -> dict[str, Any]:
    return {
        "number": "380961111111",
        "time": 1477417294667,
        "status": 2,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": message_id,
        "sent_via": "sms",
    }


def quarantine_rows(db: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT field, reason, description, raw FROM quarantine ORDER BY id")
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def stored_count(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        count: int = connection.execute("SELECT count(*) FROM reports").fetchone()[0]
        return count


@pytest.fixture
async def http(server: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.app.http_port}") as client:
        yield client


async def start_app(db: Path, clock: FakeClock, **settings: Any) -> app.App:
    return await app.start(
        Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=db, shutdown_grace=1.0, **settings),
        clock=clock,
    )


async def test_single_gms_report_is_stored_and_fetchable(server: Running, http: httpx.AsyncClient) -> None:
    body = (FIXTURES / "gms_viber_template_matched.json").read_text()
    response = await http.post(GMS, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.json() == {
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "results": [{"index": 0, "outcome": "ACCEPTED", "cursor": "1"}],
    }
    fetched = await server.stub.GetMessage(
        GetMessageRequest(message_id="9f60ac8f-e721-5027-b838-e6fcb95fcd7a")
    )
    [state] = fetched.messages
    assert state.source == Source.SOURCE_GMS
    assert state.channel == Channel.CHANNEL_VIBER
    assert state.template_id == 6349599
    assert json.loads(state.raw_payload) == json.loads(body)
    assert state.received_time.ToNanoseconds() == server.clock.now_ns


async def test_gms_batch_with_a_bad_item_names_it_and_stores_the_rest(
    server: Running, http: httpx.AsyncClient, db_path: Path
) -> None:
    bad = gms_report("ignored")
    del bad["message_id"]
    response = await http.post(GMS, json=[gms_report("g-1"), bad, gms_report("g-3")])
    assert response.status_code == 400
    body = response.json()
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (2, 0, 1)
    assert [r["outcome"] for r in body["results"]] == ["ACCEPTED", "REJECTED", "ACCEPTED"]
    assert body["results"][1]["index"] == 1
    assert body["results"][1]["error"]["field"] == "[1].message_id"
    assert body["results"][1]["error"]["reason"] == "MISSING_FIELD"
    for message_id in ("g-1", "g-3"):
        fetched = await server.stub.GetMessage(GetMessageRequest(message_id=message_id))
        assert fetched.messages[0].message_id == message_id
    [(field, reason, _, raw)] = quarantine_rows(db_path)
    assert (field, reason) == ("[1].message_id", "MISSING_FIELD")
    assert json.loads(raw) == bad


async def test_malformed_gms_seed_example_is_400_with_line_and_column_and_quarantined(
    http: httpx.AsyncClient, db_path: Path
) -> None:
    body = (FIXTURES / "gms_single_malformed.json").read_text()
    # The seed's single-report example, with its missing quote before AD-6640-7006.
    seeds = "".join(path.read_text() for path in SEEDS.glob("*.txt"))
    assert '"extra_id": AD-6640-7006",' in body
    assert '"extra_id": AD-6640-7006",' in seeds

    response = await http.post(GMS, content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["reason"] == "INVALID_JSON"
    assert error["field"] == ""
    assert "line 8 column 16" in error["description"]
    [(field, reason, description, raw)] = quarantine_rows(db_path)
    assert (field, reason) == ("", "INVALID_JSON")
    assert "line 8 column 16" in description
    assert raw == body
    assert stored_count(db_path) == 0


async def test_sent_sms_report_pushes_in_both_spellings_and_a_seen_report(
    server: Running, http: httpx.AsyncClient
) -> None:
    for name, accepted in [
        ("sent_sms_report_pull.json", 2),
        ("sent_sms_report_push_new_spelling.json", 1),
        ("sent_sms_report_seen.json", 1),
    ]:
        response = await http.post(SMS, content=(FIXTURES / name).read_bytes())
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == accepted

    old = (await server.stub.GetMessage(GetMessageRequest(message_id="MESSAGE-ID-123-xyz"))).messages[0]
    assert old.source == Source.SOURCE_SENT_SMS_REPORT
    assert old.status == DeliveryStatus.DELIVERY_STATUS_DELIVERED
    new = (await server.stub.GetMessage(GetMessageRequest(message_id="MSG-NEW-1"))).messages[0]
    assert (new.sender, new.parts_total, new.entity_id) == ("InfoSMS", 2, "entity-new")
    assert new.status == DeliveryStatus.DELIVERY_STATUS_UNDELIVERED
    seen = (await server.stub.GetMessage(GetMessageRequest(message_id="MSG-SEEN-1"))).messages[0]
    assert seen.status == DeliveryStatus.DELIVERY_STATUS_SEEN
    assert seen.channel == Channel.CHANNEL_VIBER


async def test_gms_get_answers_and_xml_callback_are_accepted_and_detected(
    server: Running, http: httpx.AsyncClient
) -> None:
    gms = FIXTURES / "providers" / "gms"
    # Ingest detects the XML callback; the webhook takes every GMS shape.
    ingested = await server.stub.Ingest(IngestRequest(payload=(gms / "callback.xml").read_text()))
    assert ingested.accepted_count == 1
    # The advanced GET answer of the same message: its SMS attempt has the callback's codes and time, but
    # also the part count, so it is another report (a report's identity is all of its content).
    response = await http.post(GMS, content=(gms / "get_advanced.json").read_bytes())
    assert response.status_code == 200, response.text
    assert [r["outcome"] for r in response.json()["results"]] == ["ACCEPTED", "ACCEPTED"]
    xml = await http.post(
        GMS, content=(gms / "callback.xml").read_bytes(), headers={"Content-Type": "text/xml"}
    )
    assert xml.status_code == 200, xml.text
    assert xml.json()["duplicate"] == 1
    message = GetMessageRequest(message_id="9f60ac8f-e721-5027-b838-e6fcb95fcd7a", include_history=True)
    [state] = (await server.stub.GetMessage(message)).messages
    # `delivered_via` "sms": the message's channel is that of its delivering attempt.
    assert (state.channel, state.status) == (Channel.CHANNEL_SMS, DeliveryStatus.DELIVERY_STATUS_DELIVERED)
    campaign = await http.post(GMS, content=(gms / "campaign_status.json").read_bytes())
    assert campaign.status_code == 200, campaign.text
    assert campaign.json()["accepted"] == 2

    # The campaign-status item is delivered at the same time, without a channel: between reports of equal
    # rank and time the digest decides, so the state's channel is that of one of them, in any order.
    fetched = await server.stub.GetMessage(message)
    [state] = fetched.messages
    assert state.status == DeliveryStatus.DELIVERY_STATUS_DELIVERED
    assert state.channel in (Channel.CHANNEL_SMS, Channel.CHANNEL_UNSPECIFIED)
    assert sorted((r.channel, r.status) for r in fetched.history) == [
        (Channel.CHANNEL_UNSPECIFIED, DeliveryStatus.DELIVERY_STATUS_DELIVERED),  # the campaign-status item
        (Channel.CHANNEL_SMS, DeliveryStatus.DELIVERY_STATUS_DELIVERED),  # the callback
        (Channel.CHANNEL_SMS, DeliveryStatus.DELIVERY_STATUS_DELIVERED),  # the GET answer's attempt
        (Channel.CHANNEL_VIBER, DeliveryStatus.DELIVERY_STATUS_EXPIRED),
    ]
    expired = (
        await server.stub.GetMessage(GetMessageRequest(message_id="e5ea7286-6849-52d7-9e1b-8719b736283e"))
    ).messages[0]
    assert (expired.status, expired.error.code) == (DeliveryStatus.DELIVERY_STATUS_EXPIRED, 35015)


async def test_messages_api_delivery_and_seen_reports_are_accepted(
    server: Running, http: httpx.AsyncClient
) -> None:
    infobip = FIXTURES / "providers" / "infobip"
    for name in ("messages_api_seen.json", "messages_api_delivery.json"):
        response = await http.post(SMS, content=(infobip / name).read_bytes())
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 1
    [state] = (
        await server.stub.GetMessage(GetMessageRequest(message_id="ABEGVUGWh3gEAgo-sLTvmQCS5kwjhsy"))
    ).messages
    assert (state.status, state.channel) == (DeliveryStatus.DELIVERY_STATUS_SEEN, Channel.CHANNEL_WHATSAPP)
    assert (state.recipient, state.parts_total) == ("+41793026727", 1)


async def test_sent_sms_report_route_reads_its_own_format(http: httpx.AsyncClient, db_path: Path) -> None:
    # A GMS body on the SentSMSReport route is not guessed at: it is rejected.
    response = await http.post(SMS, json=gms_report("g-1"))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "field": "results",
        "reason": "MISSING_FIELD",
        "description": "results must be an array of reports",
    }
    assert stored_count(db_path) == 0
    assert quarantine_rows(db_path)[0][:2] == ("results", "MISSING_FIELD")


async def test_repeated_post_is_duplicate_and_stored_once(
    server: Running, http: httpx.AsyncClient, db_path: Path
) -> None:
    body = (FIXTURES / "gms_batch.json").read_bytes()
    first = await http.post(GMS, content=body)
    assert first.status_code == 200
    assert first.json()["accepted"] == 3
    again = await http.post(GMS, content=body)
    assert again.status_code == 200
    assert again.json() == {
        "accepted": 0,
        "duplicate": 3,
        "rejected": 0,
        "results": [{"index": i, "outcome": "DUPLICATE"} for i in range(3)],
    }
    for message_id in BATCH_IDS:
        fetched = await server.stub.GetMessage(GetMessageRequest(message_id=message_id, include_history=True))
        assert len(fetched.history) == 1
    assert stored_count(db_path) == 3


async def test_oversized_body_is_413_and_nothing_is_stored(db_path: Path, clock: FakeClock) -> None:
    running = await start_app(db_path, clock, http_max_body_bytes=1024)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as http:
            big = [gms_report(f"big-{i}") for i in range(20)]
            assert len(json.dumps(big)) > 1024
            response = await http.post(GMS, json=big)
            assert response.status_code == 413
            assert running.store.latest_cursor() == 0
            assert quarantine_rows(db_path) == []
            # Under the limit, the same endpoint stores.
            small = await http.post(GMS, json=[gms_report("small-1")])
            assert small.status_code == 200
            assert len(running.store.history("small-1")) == 1
    finally:
        await running.stop()
    assert stored_count(db_path) == 1


async def test_invalid_utf8_is_400_and_nothing_is_stored(http: httpx.AsyncClient, db_path: Path) -> None:
    body = json.dumps(gms_report("utf-1")).encode().replace(b"380961111111", b"3809\xff1111111")
    response = await http.post(GMS, content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["reason"] == "INVALID_UTF8"
    bad_byte = body.index(b"\xff")
    assert f"byte {bad_byte}" in error["description"]
    assert stored_count(db_path) == 0


async def test_empty_body_is_400_invalid_json(http: httpx.AsyncClient, db_path: Path) -> None:
    response = await http.post(SMS, content=b"")
    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "INVALID_JSON"
    assert stored_count(db_path) == 0


async def test_store_that_cannot_commit_answers_503(server: Running, http: httpx.AsyncClient) -> None:
    await server.app.committer.stop()
    response = await http.post(GMS, json=gms_report("g-503"))
    assert response.status_code == 503
    assert response.json()["error"]["reason"] == "STORE_UNAVAILABLE"


async def test_only_post_is_served(http: httpx.AsyncClient) -> None:
    assert (await http.get(GMS)).status_code == 405
    assert (await http.post("/webhooks/other", json={})).status_code == 404


@pytest.fixture
async def guarded(db_path: Path, clock: FakeClock) -> AsyncIterator[tuple[app.App, httpx.AsyncClient]]:
    running = await start_app(
        db_path, clock, gms_webhook_auth="basic:gms:s3cret", sent_sms_report_webhook_auth="token:t0ken"
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as http:
            yield running, http
    finally:
        await running.stop()


async def test_basic_auth_on_the_gms_webhook(guarded: tuple[app.App, httpx.AsyncClient]) -> None:
    running, http = guarded
    body = json.dumps(gms_report("auth-1"))

    missing = await http.post(GMS, content=body)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Basic realm="dlrhub"'
    assert missing.json()["error"]["reason"] == "UNAUTHENTICATED"
    for auth in [("gms", "wrong"), ("other", "s3cret"), ("gms", "s3cret!"), ("gms", "")]:
        assert (await http.post(GMS, content=body, auth=auth)).status_code == 401, auth
    not_base64 = await http.post(GMS, content=body, headers={"Authorization": "Basic %%%"})
    assert not_base64.status_code == 401
    # The token route's credentials do not open the Basic route.
    assert (await http.post(GMS, content=body, headers={"Authorization": "Bearer t0ken"})).status_code == 401
    assert running.store.latest_cursor() == 0

    right = await http.post(GMS, content=body, auth=("gms", "s3cret"))
    assert right.status_code == 200
    assert right.json()["accepted"] == 1
    assert len(running.store.history("auth-1")) == 1


async def test_token_auth_on_the_sent_sms_report_webhook(guarded: tuple[app.App, httpx.AsyncClient]) -> None:
    running, http = guarded
    pull = (FIXTURES / "sent_sms_report_pull.json").read_bytes()
    new = (FIXTURES / "sent_sms_report_push_new_spelling.json").read_bytes()

    missing = await http.post(SMS, content=pull)
    assert missing.status_code == 401
    assert "WWW-Authenticate" not in missing.headers
    assert (await http.post(SMS, content=pull, headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert (await http.post(SMS, content=pull, params={"token": "wrong"})).status_code == 401
    assert (await http.post(SMS, content=pull, params={"token": "t0ke"})).status_code == 401
    assert (await http.post(SMS, content=pull, auth=("gms", "s3cret"))).status_code == 401
    assert running.store.latest_cursor() == 0

    bearer = await http.post(SMS, content=pull, headers={"Authorization": "Bearer t0ken"})
    assert bearer.status_code == 200
    assert bearer.json()["accepted"] == 2
    query = await http.post(SMS, content=new, params={"token": "t0ken"})
    assert query.status_code == 200
    assert query.json()["accepted"] == 1
    assert running.store.latest_cursor() == 3


# --- the channel of the route a report came to (#16.3) ---------------------------------------------------

C = Channel


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (SMS, C.CHANNEL_SMS),
        (SMS + "/sms", C.CHANNEL_SMS),
        (SMS + "/whatsapp", C.CHANNEL_WHATSAPP),
        (SMS + "/viber", C.CHANNEL_VIBER),
        (SMS + "/rcs", C.CHANNEL_RCS),
        (SMS + "/MMS", C.CHANNEL_MMS),  # any case
    ],
)
async def test_a_report_that_names_no_channel_takes_its_routes_and_one_that_does_keeps_its_own(
    server: Running, http: httpx.AsyncClient, route: str, expected: Channel.ValueType
) -> None:
    body = ssr_payload(ssr("route-none"), ssr("route-named", channel="VIBER"))
    response = await http.post(route, content=body)
    assert response.status_code == 200
    assert response.json()["accepted"] == 2
    [unnamed] = server.app.store.messages("route-none")
    [named] = server.app.store.messages("route-named")
    assert (unnamed.channel, named.channel) == (expected, C.CHANNEL_VIBER)


async def test_an_unknown_channel_route_gets_404_naming_the_channels(
    server: Running, http: httpx.AsyncClient
) -> None:
    response = await http.post(SMS + "/pigeon", content=ssr_payload(ssr("pigeon-1")))
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["field"], error["reason"]) == ("channel", "INVALID_VALUE")
    assert "'pigeon'" in error["description"]
    assert "sms, viber, whatsapp" in error["description"]
    assert server.app.store.latest_cursor() == 0
    # GMS names its channel in every report: it has no channel routes.
    assert (await http.post(GMS + "/viber", content=json.dumps(gms_report("g-1")))).status_code == 404


async def test_a_channel_route_needs_its_parent_routes_credentials(
    guarded: tuple[app.App, httpx.AsyncClient],
) -> None:
    running, http = guarded
    body = ssr_payload(ssr("wa-auth"))
    assert (await http.post(SMS + "/whatsapp", content=body)).status_code == 401
    assert (await http.post(SMS + "/nothing", content=body)).status_code == 401  # credentials first
    assert (await http.post(SMS + "/whatsapp", content=body, params={"token": "t0ken"})).status_code == 200
    [state] = running.store.messages("wa-auth")
    assert state.channel == C.CHANNEL_WHATSAPP


async def test_a_quarantined_item_keeps_its_routes_channel_when_run_again(
    server: Running, http: httpx.AsyncClient
) -> None:
    response = await http.post(SMS + "/whatsapp", content=ssr_payload({"to": "41793026727"}))
    assert response.status_code == 400
    [(quarantine_id, item)] = server.app.store.quarantined(0, 10)
    assert item.default_channel == C.CHANNEL_WHATSAPP
    # As if a later release accepted it: the item, fixed, is run again.
    with server.app.store.transaction() as tx:
        tx.quarantine(replace(item, raw=json.dumps(ssr("wa-fixed"))))
    [_, (fixed_id, _)] = server.app.store.quarantined(0, 10)
    renormalised = await server.stub.RenormaliseQuarantine(RenormaliseQuarantineRequest(ids=[fixed_id]))
    assert renormalised.resolved_count == 1
    [state] = server.app.store.messages("wa-fixed")
    assert state.channel == C.CHANNEL_WHATSAPP
    assert quarantine_id != fixed_id
