"""Pure wire code: parsing requests and replies, framing, error strings. No Twisted."""
