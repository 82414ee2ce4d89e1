"""Pipeline agents; the WATCHER's code lives in :mod:`step5.watcher`."""
