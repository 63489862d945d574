"""The chaos soak: the real service under kills, restarts and a misbehaving Miro.

``python -m soak`` runs it and prints a verdict table; see ``soak.runner``.
"""
