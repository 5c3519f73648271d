"""pneumodet: find pneumonia (lung opacity) regions on chest X-rays."""

__version__ = "0.1.0"
