"""dlrhub: delivery reports from every provider, normalised, stored and served over gRPC."""

__version__ = "0.1.0"
