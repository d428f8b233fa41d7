"""The two errors a user can act on. Both print as one line and stop the run before training."""


class ConfigError(Exception):
    """A config key, value or combination is wrong; the message names the key and the choices."""


class DataError(Exception):
    """Input data is missing or malformed; the message names the file, row/line and column."""


class TrainingError(Exception):
    """Training cannot go on as configured (non-finite loss, out of memory); the message says what to change."""
