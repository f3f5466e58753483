"""Root conftest: the project's pytest plugin (``fixtures/``) is loaded from here once it exists."""
