"""The DG2PF method on tensors and modules: the configuration, which weights are prunable and their
masks (unstructured, N:M, channel groups), the sparsity schedule, the simulated and hard pruning steps,
distillation, over-parameterized fine-tuning, BatchNorm handling, the training state, and the loop that
runs the phases with its distributed parts. A change to how pruning or training works belongs here;
nothing here reads a job's files or writes its artifacts.
"""
