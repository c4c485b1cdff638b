"""Scenarios in throwaway network namespaces: topologies, the link-delay relay, sweeps."""
