"""The ``netforge`` command line: thin click shells over the library."""
