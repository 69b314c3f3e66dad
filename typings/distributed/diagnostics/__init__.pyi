# Only what taskrun uses is declared (see ../__init__.pyi).
