"""The wiring: config, CLI, app factory, REST API, auth, database."""
