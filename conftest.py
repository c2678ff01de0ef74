# Every test run in this repository loads the shared fattn plugin (device choice, NaN-poisoned
# outputs, seeding, markers). See tests_shared/plugin.py.
pytest_plugins = ["tests_shared.plugin"]
