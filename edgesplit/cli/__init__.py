"""Command-line interface: one module per subcommand, each with ``add_parser`` and ``run``.

Modules here import only the standard library at the top: ``edgesplit client`` must start on a
device without torch, and ``--help`` must be instant.
"""
