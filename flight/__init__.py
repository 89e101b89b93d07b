"""flightdeck's front doors: Flight SQL server, CLI, configuration and the Runtime."""

__version__ = "0.1.0"
