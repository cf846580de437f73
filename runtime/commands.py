"""CLI for runtime/."""


def register(sub) -> None:
    pass
