"""placeholder"""
class StorageError(Exception):
    """The database cannot be used; `str()` is one line for the user or the operator."""
