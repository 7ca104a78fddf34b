"""The ``dg2pf`` command line."""
