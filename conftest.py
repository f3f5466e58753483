"""Root conftest: loads the project's pytest plugin (``fixtures/plugin.py``), and pytester for the plugin's own
tests (a plugin list is only allowed in the top-level conftest)."""

pytest_plugins = ["hil.fixtures.plugin", "pytester"]
