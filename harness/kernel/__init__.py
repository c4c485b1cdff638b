"""Reading and setting kernel state: sock_diag, conntrack, counters, sysctls, namespaces,
parent-death.

Takes plain values and returns arrays; knows no scenario. Imports nothing of eph
but ``harness.errors``.
"""
