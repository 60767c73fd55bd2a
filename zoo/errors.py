"""The one exception type for user errors (its own module so that ``python -m zoo.cli``, which
runs zoo/cli.py as ``__main__``, and the modules importing ``zoo.cli`` share one class)."""


class ZooError(Exception):
    """A user error: printed as one line, exit code 2."""
