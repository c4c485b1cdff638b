"""From records to a report: the summary, the analysis, figures and HTML.

The way through: ``summary`` (the first sections, from the records) and
``analysis`` (tuples, occupancy, hosts, capacity) build a :class:`Summary`
(``model``, its sections in ``sections``), which ``figures`` and ``html`` render.
"""

from harness.summary import SCHEMA_VERSION, Summary, summary_schema

__all__ = ["SCHEMA_VERSION", "Summary", "summary_schema"]
