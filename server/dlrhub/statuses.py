"""Facts about the unified statuses: their merge rank and whether they are final."""

from __future__ import annotations

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus

# The merge rank (merge.py: the greatest wins): UNSPECIFIED 0 < ACCEPTED 10 < SENT 20 < the final
# failures 30 (among them, the later event wins) < DELIVERED 40 < SEEN 50 (seen implies delivered).
RANK: dict[int, int] = {
    DeliveryStatus.DELIVERY_STATUS_UNSPECIFIED: 0,
    DeliveryStatus.DELIVERY_STATUS_ACCEPTED: 10,
    DeliveryStatus.DELIVERY_STATUS_SENT: 20,
    DeliveryStatus.DELIVERY_STATUS_UNDELIVERED: 30,
    DeliveryStatus.DELIVERY_STATUS_EXPIRED: 30,
    DeliveryStatus.DELIVERY_STATUS_REJECTED: 30,
    DeliveryStatus.DELIVERY_STATUS_FAILED: 30,
    DeliveryStatus.DELIVERY_STATUS_DELIVERED: 40,
    DeliveryStatus.DELIVERY_STATUS_SEEN: 50,
}

# The provider expects no further report (though DELIVERED may overtake a
# final failure and SEEN may follow DELIVERED; the merge rule handles both).
FINAL: frozenset[int] = frozenset(status for status, rank in RANK.items() if rank >= 30)


def status_by_name(name: str) -> DeliveryStatus.ValueType:
    """The status for "DELIVERED" or "DELIVERY_STATUS_DELIVERED"; ValueError if unknown."""
    full = name if name.startswith("DELIVERY_STATUS_") else f"DELIVERY_STATUS_{name}"
    try:
        return DeliveryStatus.Value(full)
    except ValueError:
        raise ValueError(f"unknown status {name!r}") from None
