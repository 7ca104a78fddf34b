"""Rows of the table a finished prune job prints (``dg2pf prune``'s and ``dg2pf demo``'s result)."""

from __future__ import annotations

from dg2pf_contract.results import Metrics


def latency_rows(m: Metrics) -> list[tuple[str, str]]:
    """One row per backend: the measured speed-up of the pruned model over the dense one, per batch size."""
    latency = m.latency
    if latency is None:
        return []
    if not latency.backends:
        return [("latency", f"not measured: {latency.reason or '-'}")]
    rows = []
    for backend, by_batch in latency.backends.items():
        cells = [
            f"batch {n}: {r.dense_ms:.2f} -> {r.pruned_ms:.2f} ms ({r.speedup:.2f}x)"
            + (f", int8 {r.int8_ms:.2f} ms ({r.int8_speedup:.2f}x)" if r.int8_speedup is not None else "")
            for n, r in by_batch.items()
            if r.speedup is not None
        ]
        if cells:
            rows.append((f"latency {backend}", "; ".join(cells)))
    macs = f"MACs ratio {latency.macs_ratio:.3f}x; " if latency.macs_ratio is not None else ""
    rows.append(("latency threads", f"{latency.threads} ({macs}speed-up = dense / pruned median)"))
    return rows
