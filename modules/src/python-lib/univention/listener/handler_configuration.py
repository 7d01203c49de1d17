"""``ListenerModuleConfiguration``: what a module declares about itself."""

import re

from univention.config_registry import ConfigRegistry
from univention.listener.exceptions import ListenerModuleConfigurationError

__all__ = ["ListenerModuleConfiguration"]

_NAME = re.compile(r"^[A-Za-z0-9,.\-_]+$")


class ListenerModuleConfiguration(object):
    """Each key may be a class attribute or a ``get_<key>()`` method."""

    name = ""
    description = ""
    ldap_filter = ""
    attributes = []
    priority = 50.0
    listener_module_class = None

    _mandatory_attributes = ("name", "description", "ldap_filter", "listener_module_class")

    def __init__(self, *args, **kwargs):
        for key, value in kwargs.items():
            if key in self.get_configuration_keys():
                setattr(self, key, value)
        self._run_checks()

    def __repr__(self):
        return "%s(%s)" % (
            type(self).__name__,
            ", ".join("%s=%r" % item for item in sorted(self.get_configuration().items())),
        )

    def _run_checks(self):
        for key in self._mandatory_attributes:
            if not self._get_property(key):
                raise ListenerModuleConfigurationError("Missing or empty configuration value %r." % (key,))
        name = self.get_name()
        if not isinstance(name, str) or not _NAME.match(name):
            raise ListenerModuleConfigurationError(
                "Module name %r may only contain ASCII letters, digits and ',.-_'." % (name,)
            )
        if not isinstance(self.get_attributes(), list):
            raise ListenerModuleConfigurationError("Optional attribute 'attributes' must be a list.")
        if not isinstance(self.get_ldap_filter(), str):
            raise ListenerModuleConfigurationError("Attribute 'ldap_filter' must be a string.")

    def get_configuration_keys(self):
        return ["attributes", "description", "ldap_filter", "listener_module_class", "name", "priority"]

    def get_configuration(self):
        return {key: self._get_property(key) for key in self.get_configuration_keys()}

    def _get_property(self, key):
        return getattr(self, "get_%s" % (key,))()

    def get_name(self):
        return self.name

    def get_description(self):
        return self.description

    def get_ldap_filter(self):
        return self.ldap_filter

    def get_attributes(self):
        return self.attributes

    def get_priority(self):
        return float(self.priority)

    def get_listener_module_class(self):
        return self.listener_module_class

    def get_listener_module_instance(self, *args, **kwargs):
        return self.get_listener_module_class()(self, *args, **kwargs)

    def get_active(self):
        """False when UCR ``listener/module/<name>/deactivate`` is true."""
        ucr = ConfigRegistry().load()
        return not ucr.is_true("listener/module/%s/deactivate" % (self.get_name(),), False)
