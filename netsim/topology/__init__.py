"""Topology files: YAML schema, Kubernetes manifests, validation and the frozen model."""
from .load import expand, load, load_data, load_text
from .model import Topology

__all__ = ["expand", "load", "load_data", "load_text", "Topology"]
