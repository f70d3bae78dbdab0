"""The network lab: namespaces joined by a user-space impairing hub (see lab.py)."""

from netlab.impairment import CLEAN, Impairment
from netlab.lab import Lab, LabError, in_own_network_namespace

__all__ = ["CLEAN", "Impairment", "Lab", "LabError", "in_own_network_namespace"]
