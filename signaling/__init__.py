"""Signaling: the socket.io namespace of a live room."""
