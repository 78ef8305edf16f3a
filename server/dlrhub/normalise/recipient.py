"""Recipient addresses in E.164 form."""

from __future__ import annotations


def e164(address: str) -> str:
    """Digits get a leading "+"; "+digits" and any other address stay as given."""
    address = address.strip()
    return f"+{address}" if address.isascii() and address.isdigit() else address
