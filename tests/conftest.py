# Shared fixtures live in modules named *_fixtures.py, registered here.
pytest_plugins = ["tests.fastloader_fixtures", "tests.train_fixtures"]

import os
import tempfile

# `precision: auto` caches its CPU measurement per machine; tests keep theirs apart from the user's.
os.environ.setdefault("FASTCIFAR_CACHE", tempfile.mkdtemp(prefix="fastcifar-cache-"))
