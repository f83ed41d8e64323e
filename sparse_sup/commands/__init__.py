"""Subcommands of ``sparse-sup``: one module each, with ``add_arguments(parser)`` and ``run(args) -> int``.

A module may set ``ACCEPTS_OVERRIDES = True`` to receive ``--section.key=value`` arguments as
``args.overrides`` (the dispatcher in ``sparse_sup.cli`` collects them)."""
