"""The per-run report: :mod:`~flows.report.build` puts the sections
(:mod:`~flows.report.overview`, :mod:`~flows.report.training`,
:mod:`~flows.report.evaluation`) together from what :mod:`~flows.report.data` reads;
:mod:`~flows.report.blocks` renders them as Markdown (the Prefect artifact) or one
self-contained HTML file; :mod:`~flows.report.fmt` and :mod:`~flows.report.plots` format
values and draw figures. The package itself imports nothing."""
