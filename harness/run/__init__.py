"""A run's life, from its children's start to its finalized directory.

- :mod:`~harness.run.lifecycle`: ``eph run``: start the children, wait for the load's
  end, stop them in order, finalize;
- :mod:`~harness.run.placement`: where each child runs (the host, or a lab's namespace);
- :mod:`~harness.run.worker`: ``eph worker``, a Locust worker of a distributed run;
- :mod:`~harness.run.merge`: the record parts into ``connections.parquet``, in windows;
- :mod:`~harness.run.finalize`: parts -> Parquet -> analysis -> ``summary.json`` ->
  ``report.html``; :mod:`~harness.run.readings`: the files it reads besides the records;
- :mod:`~harness.run.crash`: a run whose eph died, as ``eph report`` tells it;
- :mod:`~harness.run.leftovers`: a distributed run's workers that never shipped.

Nothing is imported here: ``harness.run.merge`` alone does not load the report.
"""
