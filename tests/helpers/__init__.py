"""Code the tests import by name (callables for the python runner, ...)."""
