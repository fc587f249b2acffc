"""effrun: an experiment runner for ML-systems efficiency research."""
__version__ = "0.1.0"
