"""DHCPv6 for network boot (RFC 8415, RFC 5970): proxy and full mode."""
