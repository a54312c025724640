"""NTP: packet codec, client exchange rules, sample maths, source selection."""
