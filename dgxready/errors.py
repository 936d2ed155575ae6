class DgxReadyError(Exception):
    """An error the user can act on; tasks print its message and exit non-zero."""


class ConfigError(DgxReadyError):
    """A configuration file failed validation; the message names the file and the field."""
