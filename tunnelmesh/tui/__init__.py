"""`tunnelmesh tui`: a terminal UI over the daemon's control socket (docs/tui.md)."""
