"""Shared by the app tests: launch a Blocks app on a free local port."""
import socket

from app import launch


def serve(demo) -> str:
    """Launch demo on a free 127.0.0.1 port without blocking; returns its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    return url
