"""Everything that makes connections: the churn plan, pacing, the gevent and
uvloop engines, how an attempt's outcome is recorded, Locust users, hooks and
stats, distributed mode.

The only package that imports locust (``tests/test_package.py`` checks it):
importing locust monkey-patches the whole process with gevent.
"""
