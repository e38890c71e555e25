"""medfed's front door: the ``medfed`` command line (``medfed/cli.py``) and ``python -m medfed``.

Only the front door lives here; each command group stays in the package it serves
(see README "Layout").
"""
