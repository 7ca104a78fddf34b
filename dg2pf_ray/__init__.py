"""Ray adapters for dg2pf_core: Ray Train (DDP workers, fault tolerance) and Ray Tune (schedule search).

dg2pf_core knows nothing of Ray; everything Ray-specific lives in this package.
"""
