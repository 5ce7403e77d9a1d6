"""Example API modules. The server ships a module's source to every client, which runs it in a
fresh module namespace; see ``demo.py``."""
