"""The channel an endpoint serves, by its lower-case name: `whatsapp` in a webhook route
(`/webhooks/sent-sms-report/whatsapp`) or in DLRHUB_POLL_CHANNEL.

A report whose body names no channel takes the channel of the endpoint it came to; one whose body
names its channel keeps it.
"""

from __future__ import annotations

from deliveryreport.v1.delivery_report_pb2 import Channel

__all__ = ["CHANNELS", "channel_named"]

_PREFIX = "CHANNEL_"
# Every channel of the contract but the unspecified one, by its lower-case name (sms, viber, ...).
CHANNELS: dict[str, Channel.ValueType] = {
    name.removeprefix(_PREFIX).lower(): value
    for name, value in Channel.items()
    if value != Channel.CHANNEL_UNSPECIFIED
}


def channel_named(name: str) -> Channel.ValueType:
    """The channel called `name` (lower-case, as in CHANNELS); raises ValueError listing the names."""
    try:
        return CHANNELS[name]
    except KeyError:
        raise ValueError(f"no channel is called {name!r}; the channels are {', '.join(CHANNELS)}") from None
