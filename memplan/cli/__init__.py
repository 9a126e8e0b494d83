"""The command line: thin typer commands (parse -> pure logic -> render -> exit code)."""
