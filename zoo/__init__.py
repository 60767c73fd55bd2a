"""moe-zoo: Mixture-of-Experts methods for non-language domains on one shared backbone."""
__version__ = "0.1.0"
