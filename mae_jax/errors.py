"""Which exceptions are a user's mistake (one `error:` line, exit 2) rather than a bug."""

USER_ERRORS = (KeyError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
               ImportError, FloatingPointError)
