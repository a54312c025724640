"""NTS (RFC 8915): NTS-KE records and NTS extension fields."""
