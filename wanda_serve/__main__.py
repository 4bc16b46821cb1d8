from wanda_serve.cli import cli

cli()
