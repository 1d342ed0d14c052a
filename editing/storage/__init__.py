"""Files and data: atomic writes, build-once locks, cache paths, the bundled fact base."""
