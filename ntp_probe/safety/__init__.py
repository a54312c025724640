"""What may be sent and what servers told us: target policy, KoD backoff, leap memory."""
