"""The web process (``python -m worker web``): connect users, disconnect them, health, metrics.

``app`` holds the Flask app, ``serving`` its HTTP server, ``state`` the OAuth state,
``metrics`` the Prometheus rendering. Nothing is imported here, so the CLI can use ``state``
without Flask and tornado.
"""
