"""Disaggregated diffusion inference engine: stages as a YAML dataflow graph over Mooncake and MQTT."""

__version__ = "0.1.0"
__all__ = ["__version__"]
