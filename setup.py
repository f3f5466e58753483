"""Packages: ``hil`` and its subpackages, plus the pytest plugin in the top-level ``fixtures/`` folder, installed as
``hil.fixtures`` so that installing the project never claims the top-level import name ``fixtures`` (which
another package on the index owns). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hil", "hil.*"]), "hil.fixtures"],
    package_dir={"hil.fixtures": "fixtures"},
)
