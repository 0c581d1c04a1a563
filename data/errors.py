"""The one error type the data package raises for bad input."""


class DataError(RuntimeError):
    """Data that cannot be loaded as configured; the message names the path and the fix."""
