"""The `wanda-serve` command (and `python -m wanda_serve`)."""

import sys


def main():
    try:
        # torch and transformers take seconds to import; Ctrl-C then must end as quietly as Ctrl-C later.
        from wanda_serve.cli import cli
    except KeyboardInterrupt:
        sys.exit("Error: interrupted; nothing was written")
    cli()


if __name__ == "__main__":
    main()
