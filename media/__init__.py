"""Media: the forwarding relay on aiortc."""
