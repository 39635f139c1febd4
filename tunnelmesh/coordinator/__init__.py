"""The coordinator: SQLite store (store.py), HTTP service (service.py), and the
client nodes and admin commands use (client.py). See docs/coordinator.md."""
