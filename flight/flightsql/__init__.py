"""The Arrow Flight SQL door."""
