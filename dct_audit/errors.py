"""One exception type for every mistake a user can fix; the CLI prints it as one line and exits 2."""


class DctAuditError(Exception):
    """Bad input or a missing resource, with a message that says what is wrong and how to fix it."""


class OtherSettings(DctAuditError):
    """A run folder ``root`` holds a run made with other settings (``changes``: what differs, as text)."""

    def __init__(self, root, changes: str):
        self.root, self.changes = root, changes
        super().__init__(
            f"'{root}' holds a run made with other settings ({changes}); "
            "pass --overwrite to replace it or --name to start a new run"
        )
