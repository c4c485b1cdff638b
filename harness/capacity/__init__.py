"""The capacity model, ``eph plan`` and ``eph preflight``."""
