"""The showcase: a scripted SRE agent works a live incident through flightdeck's MCP door.

``agent`` is the client (it speaks only MCP, plus the operator's recommendation channel),
``postmortem`` writes its report, ``incident`` wires a run together, ``__main__`` is the CLI.
"""
