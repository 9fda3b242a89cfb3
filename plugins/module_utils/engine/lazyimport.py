"""Third-party client libraries imported when first used, not when the engine is imported.

The kind registry (``kinds/__init__.py``) imports every kind's source and target, and so every client
library: the Kubernetes client alone takes one to three seconds to import, psycopg and
redis a few tenths more. A CronJob of any kind paid all of it on every start, and so did
every module run. A ``LazyModule`` stands where the module would be bound and imports it on
first attribute access; ``available`` says whether it is installed at all (for the
``MissingDependencyError`` of the code that needs it).
"""

import importlib


class LazyModule:
    """``LazyModule("psycopg")`` behaves as the module ``psycopg`` once an attribute is read.

    ``also`` names submodules to import with it (``kubernetes.dynamic`` is not imported by
    ``import kubernetes``).
    """

    def __init__(self, name, also=()):
        self._name = name
        self._also = tuple(also)
        self._module = None
        self._missing = False

    def load(self):
        """The module, or None when it (or one of ``also``) is not installed."""
        if self._module is None and not self._missing:
            try:
                for name in self._also:
                    importlib.import_module(name)
                self._module = importlib.import_module(self._name)
            except ImportError:
                self._missing = True
        return self._module

    @property
    def available(self):
        return self.load() is not None

    @property
    def loaded(self):
        """True once imported (for tests of what a start imports)."""
        return self._module is not None

    def __getattr__(self, attribute):
        module = self.load()
        if module is None:
            raise AttributeError("%s is not installed (needed for %s)" % (self._name, attribute))
        return getattr(module, attribute)
