"""Entry point of the ``xmipp-accel`` command (also ``python -m xmipp_accel``).

This is the composition root, the one module above every layer: it hands the scripted Scipion
workflow (:mod:`xmipp_accel.workflows`, above the protocols) to the command line (below them), so that
``xmipp-accel demo --scipion`` works while ``cli`` never imports upward.
"""
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with the workflow layer registered; returns the exit status."""
    from xmipp_accel.cli.__main__ import main as cli_main

    words = list(sys.argv[1:] if argv is None else argv)
    if "demo" in words:   # only the demo needs the hook (importing cli.demo costs ~0.2 s per command)
        from xmipp_accel.cli import demo

        def scipion_workflow(args, outdir, *, box, n):  # imported only when --scipion is used (needs pwem)
            from xmipp_accel.workflows.demo_scipion import run_scipion_demo
            return run_scipion_demo(args, outdir, box=box, n=n)

        demo.SCIPION_WORKFLOW = scipion_workflow
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
