"""Shared model building blocks (attention, norms, rotary embeddings, vision towers, Mamba).

Dependency rule: ``vision`` imports none of the workbench's sibling packages.
"""
