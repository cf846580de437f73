"""CLI for benchmarks/."""


def register(sub) -> None:
    pass
