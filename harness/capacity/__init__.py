"""The capacity models (a client host's ports, a NAT's pool), eph plan and preflight."""
