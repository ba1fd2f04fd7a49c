"""Topology files: YAML schema, Kubernetes manifests, validation and the frozen model."""
from .load import load, load_text
from .model import Topology

__all__ = ["load", "load_text", "Topology"]
