"""One module per `smsq` verb: `add_arguments(parser)` and `main(settings, args)`."""


class UsageError(Exception):
    """Bad input on the command line; the message says which and why (exit status 2)."""
