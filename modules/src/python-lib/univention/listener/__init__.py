"""The object-oriented listener module API (``univention.listener``), as shipped with the
Rust directory listener for hosts without UCS's own package."""

from univention.listener.api_adapter import ListenerModuleAdapter
from univention.listener.exceptions import (
    ListenerModuleConfigurationError,
    ListenerModuleError,
    ListenerModuleRuntimeError,
)
from univention.listener.handler import ListenerModuleHandler
from univention.listener.handler_configuration import ListenerModuleConfiguration

__all__ = [
    "ListenerModuleAdapter",
    "ListenerModuleConfiguration",
    "ListenerModuleConfigurationError",
    "ListenerModuleError",
    "ListenerModuleHandler",
    "ListenerModuleRuntimeError",
]
