"""The `hetserve` command, above every other package: it composes the services, the tools and
the launcher, and nothing imports it."""
