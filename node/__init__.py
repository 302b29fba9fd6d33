"""The peer's roles: the owner's daemon, its store and Worker, the scientist's client, the CLI."""
