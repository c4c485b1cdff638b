"""The contract: ``summary.json`` of a run (:class:`Summary`) and of an observation
(:class:`ObserveSummary`), their sections, and the published JSON Schema.

Pydantic models and the standard library only: importing the contract loads none of
eph's machinery (no numpy, no pyarrow, no analysis), so that any reader of a run
directory (the report, ``eph plan --from``, a sweep, a user's own script) can hold
a summary, and a test checks that it stays so. The analysis builds these models;
the report renders them.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # the names, for type checkers; loaded on first use below
    from harness.summary.observed import (
        OBSERVE_SCHEMA_VERSION,
        ExecRecord,
        HostCounters,
        NamespaceTotals,
        ObservedPath,
        ObserveSummary,
        PathExhaustion,
        PathOpener,
        PathOwner,
        Traced,
    )
    from harness.summary.run_summary import (
        SCHEMA_VERSION,
        Crash,
        PriorRun,
        Summary,
        summary_schema,
        validated,
    )
    from harness.summary.sections import (
        BindAttempt,
        Capacity,
        Connections,
        Conservation,
        Cpu,
        CpuBand,
        Distributed,
        Exhaustion,
        HostSection,
        Http,
        Kernel,
        KernelWitness,
        Latency,
        LatencyCliff,
        Listener,
        LoadProcesses,
        MissingWorker,
        Nat,
        NatDestination,
        Occupancy,
        OccupancyBand,
        Outage,
        ParityQuantiles,
        Ports,
        Quantiles,
        SamplesInfo,
        Section,
        Service,
        Startup,
        TimeWait,
        TupleExample,
        Tuples,
    )
    from harness.summary.summary_error import (
        SummaryError,
    )

# name -> the module that holds it: loaded on first use, so that importing one part
# (harness.errors takes only SummaryError) does not build every model (~0.3 s)
_LAZY = {
    "BindAttempt": "harness.summary.sections",
    "Capacity": "harness.summary.sections",
    "Connections": "harness.summary.sections",
    "Conservation": "harness.summary.sections",
    "Cpu": "harness.summary.sections",
    "CpuBand": "harness.summary.sections",
    "Crash": "harness.summary.run_summary",
    "Distributed": "harness.summary.sections",
    "ExecRecord": "harness.summary.observed",
    "Exhaustion": "harness.summary.sections",
    "HostCounters": "harness.summary.observed",
    "NamespaceTotals": "harness.summary.observed",
    "HostSection": "harness.summary.sections",
    "Http": "harness.summary.sections",
    "Kernel": "harness.summary.sections",
    "KernelWitness": "harness.summary.sections",
    "Latency": "harness.summary.sections",
    "LatencyCliff": "harness.summary.sections",
    "Listener": "harness.summary.sections",
    "MissingWorker": "harness.summary.sections",
    "Nat": "harness.summary.sections",
    "NatDestination": "harness.summary.sections",
    "OBSERVE_SCHEMA_VERSION": "harness.summary.observed",
    "ObserveSummary": "harness.summary.observed",
    "ObservedPath": "harness.summary.observed",
    "Occupancy": "harness.summary.sections",
    "OccupancyBand": "harness.summary.sections",
    "Outage": "harness.summary.sections",
    "ParityQuantiles": "harness.summary.sections",
    "PathExhaustion": "harness.summary.observed",
    "PathOpener": "harness.summary.observed",
    "PathOwner": "harness.summary.observed",
    "Ports": "harness.summary.sections",
    "PriorRun": "harness.summary.run_summary",
    "Quantiles": "harness.summary.sections",
    "SCHEMA_VERSION": "harness.summary.run_summary",
    "SamplesInfo": "harness.summary.sections",
    "Section": "harness.summary.sections",
    "Service": "harness.summary.sections",
    "Startup": "harness.summary.sections",
    "LoadProcesses": "harness.summary.sections",
    "Summary": "harness.summary.run_summary",
    "SummaryError": "harness.summary.summary_error",
    "TimeWait": "harness.summary.sections",
    "Traced": "harness.summary.observed",
    "TupleExample": "harness.summary.sections",
    "Tuples": "harness.summary.sections",
    "summary_schema": "harness.summary.run_summary",
    "validated": "harness.summary.run_summary",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'harness.summary' has no attribute {name!r}")
    return getattr(_importlib.import_module(module), name)


__all__ = [
    "OBSERVE_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "BindAttempt",
    "Capacity",
    "Connections",
    "Conservation",
    "Cpu",
    "CpuBand",
    "Crash",
    "Distributed",
    "ExecRecord",
    "Exhaustion",
    "HostCounters",
    "HostSection",
    "Http",
    "Kernel",
    "KernelWitness",
    "Latency",
    "LatencyCliff",
    "Listener",
    "LoadProcesses",
    "MissingWorker",
    "NamespaceTotals",
    "Nat",
    "NatDestination",
    "ObserveSummary",
    "ObservedPath",
    "Occupancy",
    "OccupancyBand",
    "Outage",
    "ParityQuantiles",
    "PathExhaustion",
    "PathOpener",
    "PathOwner",
    "Ports",
    "PriorRun",
    "Quantiles",
    "SamplesInfo",
    "Section",
    "Service",
    "Startup",
    "Summary",
    "SummaryError",
    "TimeWait",
    "Traced",
    "TupleExample",
    "Tuples",
    "summary_schema",
    "validated",
]
