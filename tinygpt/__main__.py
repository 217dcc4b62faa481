"""`python -m tinygpt` and the `tinygpt` script: Ctrl-C is recorded before anything heavy is imported (see
`tinygpt.interrupts`), then the command runs."""

import sys


def run():
    from tinygpt import interrupts

    interrupts.install()
    from tinygpt.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
