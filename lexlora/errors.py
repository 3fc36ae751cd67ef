"""lexlora's own error types: every user-facing failure is one of these, with a message that names
the file, line, field or key at fault. The CLI prints them without a traceback."""


class LexloraError(Exception):
    """Base class for every error lexlora raises on bad input."""


class ConfigError(LexloraError):
    """A config file or a `key=value` override is wrong."""


class DataError(LexloraError):
    """A data file, record or split spec is wrong."""


class AdapterError(LexloraError):
    """An adapter directory is missing, incomplete, corrupted or does not fit the base model."""


class ModelLoadError(LexloraError):
    """A base model, tokenizer or embedding model could not be loaded."""


class RequestError(LexloraError):
    """An HTTP request to `lexlora serve` is malformed or too large; `status` is its HTTP status
    (400, 404, 413 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
