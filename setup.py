"""Only the package list lives here: pyproject.toml cannot combine package discovery with one extra
package. ``sparse_sup.configs`` is the top-level ``configs/`` folder (see ``package-dir`` in
pyproject.toml), so the presets ship inside the wheel and ``--config debug-cpu`` works after a
non-editable install."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["sparse_sup", "sparse_sup.*"]), "sparse_sup.configs"])
