"""The fidelity benchmark: DG2PF, its ablations and peer pruning methods on equal budgets (docs/fidelity.md)."""
