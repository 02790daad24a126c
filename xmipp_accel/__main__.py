"""``python -m xmipp_accel`` runs the ``xmipp-accel`` command line."""
import sys

from xmipp_accel.cli.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
