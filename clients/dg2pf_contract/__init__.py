"""The contract of a dg2pf job, shared by every layer: what goes in and what comes out.

Pure pydantic and the standard library: the light client (``pip install ./clients``), the service, the
Ray adapters, the CLI and dg2pf_core all import it, and importing it never brings torch or Ray.

- ``options``: the algorithm's options (names, defaults, bounds, presets, choices).
- ``job``: ``JobSpec``, the one description of a job (POST /jobs, ``dg2pf prune JOB.yaml``, recipes/).
- ``results``: ``Metrics``, the typed result document (metrics.json), and its parts.
- ``artifacts``: ``Artifacts``, the one place a job's file names are spelled.
- ``api``: the HTTP API's response models.
"""
