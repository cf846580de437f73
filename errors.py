"""The one exception type users see. The CLI prints its message without a traceback."""


class SinglepassError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
