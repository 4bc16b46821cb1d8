class WandaServeError(Exception):
    """A problem with the user's input or environment: the CLI prints it as one line, no traceback."""
