"""The ``tokenmerge`` command line."""
