"""What a clean CLI error looks like, for the tests of every command."""


def one_line_error(r) -> str:
    """The message of a clean CLI error (ClickException / UsageError), never an uncaught exception."""
    assert r.exit_code in (1, 2), (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}\n{r.output}"
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert "Traceback" not in r.output and "loading" not in r.output, r.output
    return errors[0]
