"""The test suite (a package, so that ``tests.helpers`` never resolves to another distribution's top-level
``tests`` package: torch-fidelity, for one, installs one into site-packages)."""
