"""The reconciler: drives every task to its true end state (submission, event folding, the
in-flight index, task event logs, per-owner worker configs).
"""
