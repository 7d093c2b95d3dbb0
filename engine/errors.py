"""Errors the engine raises; the CLI turns each into one clear line."""


class LlmdError(Exception):
    """Base of every error meant for the user, not a traceback."""


class ModelNotFound(LlmdError): ...


class UnsupportedModel(LlmdError): ...


class BadPlan(LlmdError): ...


class PromptTooLong(LlmdError): ...


class WorkerLost(LlmdError): ...


class BadSampling(LlmdError): ...


class ModelDoesNotFit(LlmdError): ...
