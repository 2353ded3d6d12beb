"""tests/passes on the import path, so that the tests in its subfolders (prune/, structured/) share its
helpers (`_tiny_decoders`) as the tests beside them do (pytest puts each conftest's folder first on
sys.path)."""
