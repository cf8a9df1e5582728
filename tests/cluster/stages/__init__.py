"""Stage kinds for the cluster tests (``kind: tests.cluster.stages.<name>``)."""
