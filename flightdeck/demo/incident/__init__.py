"""The live incident: a deterministic simulation of the checkout outage that the bundled demo
shows as a static day, played in compressed time against real sources, with its ground truth.

``model`` draws each simulated minute and records the truth, ``sources`` writes what the
systems would write (orders database, log and metric files, the guides' git repository),
``control`` serves Grafana-shaped alerts and takes the agent's recommendations, ``simulator``
plays it all on a clock and writes the flightdeck configuration that reads it.
"""
