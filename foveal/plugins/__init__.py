"""Bundled plugins. Every public module here is a plugin: it implements the same
``register_components`` hook (``foveal.registry.hookimpl``) that third-party plugins implement,
and the registry loads each one in isolation (a failing module is skipped with a warning)."""
