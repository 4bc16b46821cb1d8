# What Ctrl-C before any output was written prints, whether it came during the imports (wanda_serve/__main__.py)
# or during the work (cli_options.user_errors_as_one_line).
INTERRUPTED = "interrupted; nothing was written"


class WandaServeError(Exception):
    """A problem with the user's input or environment: the CLI prints it as one line, no traceback."""
