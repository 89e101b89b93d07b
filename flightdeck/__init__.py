"""flightdeck's core: configuration, the Stack, the Service every door calls, SQL functions, the demo."""

__version__ = "0.1.0"
