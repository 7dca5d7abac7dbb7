"""pharmafl: NVIDIA FLARE jobs and components for federated drug discovery."""

__version__ = "0.1.0"
