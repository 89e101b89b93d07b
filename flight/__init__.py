"""flightdeck's front doors (Flight SQL) and the `flightdeck` command, the composition root."""
