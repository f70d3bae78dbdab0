"""The web client's static files (no Python here): a package only so that a plain
`pip install .` ships them beside the server, which serves them from this directory."""
