"""The `wanda-serve` command (and `python -m wanda_serve`)."""

import sys


def main():
    try:
        # torch and transformers take seconds to import; Ctrl-C then must end as quietly as Ctrl-C later.
        from wanda_serve.cli import cli
    except KeyboardInterrupt:
        from wanda_serve.errors import INTERRUPTED  # light: no torch

        sys.exit(f"Error: {INTERRUPTED}")
    cli()


if __name__ == "__main__":
    main()
