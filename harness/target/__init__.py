"""Everything that accepts connections: the listener and the stand-in service."""
