"""edgepack: take a trained model to production on cloud CPUs and edge devices."""

__version__ = "0.1.0"
