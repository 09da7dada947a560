"""One exception type for every mistake a user can fix; the CLI prints it as one line and exits 2."""


class DctAuditError(Exception):
    """Bad input or a missing resource, with a message that says what is wrong and how to fix it."""
