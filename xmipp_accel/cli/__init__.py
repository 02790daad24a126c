"""The ``xmipp-accel`` command line: one module per subcommand, each with
``add_args(parser)`` and ``main(args)``. Commands read inputs with
:mod:`xmipp_accel.io`, call the algorithms in :mod:`xmipp_accel.gpu` and write
outputs atomically. Every command accepts ``--json`` (one JSON summary object
as the last line of stdout), ``--device``, ``--gpus`` and ``--quiet``.
Scipion protocols run these same commands through ``runJob``.
"""
