"""Exceptions of the object-oriented listener module API."""


class ListenerModuleError(Exception):
    pass


class ListenerModuleConfigurationError(ListenerModuleError):
    pass


class ListenerModuleRuntimeError(ListenerModuleError):
    pass
