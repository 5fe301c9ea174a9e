"""Log database of environment transitions (and, next, the proxy world model)."""
