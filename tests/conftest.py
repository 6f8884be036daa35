# Shared fixtures live in modules named *_fixtures.py, registered here.
pytest_plugins = ["tests.fastloader_fixtures"]
