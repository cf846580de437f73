"""CLI for export/."""


def register(sub) -> None:
    pass
