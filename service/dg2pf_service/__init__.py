"""The dg2pf pruning service: HTTP API, job store, execution on Ray."""
