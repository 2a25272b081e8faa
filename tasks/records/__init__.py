"""What runs did, kept beside the artifacts as well as in the catalog.

``runs`` (run records: ``runs`` and ``stages`` rows, one :class:`~tasks.records.runs.StageRecord`
per stage event, in the run's record file and the catalog); ``run_state`` (whether a run
is really running: its heartbeat and the watch on the process that started it);
``rows`` (a stage's catalog rows kept in its folder, and their ingestion); ``rebuild``
(the catalog rebuilt from run records and stage folders); ``gate_results`` (the
regression gates evaluated at the end of a run, stored with its record).
"""
