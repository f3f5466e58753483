"""Flows, written once above the rig's lifecycle: the CLI, the pytest plugin and the benchmarks call the same one
and watch it through a listener."""
