"""CLI subcommands, one module each (see dori.cli.COMMANDS)."""
