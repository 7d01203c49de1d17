"""``ListenerModuleHandler``: the object-oriented listener module API (UCS 4.2+).

A subclass with an inner ``Configuration`` class, defined in a module file the listener
loads, turns that file into a legacy module: at class creation a metaclass builds the
configuration and injects ``name``, ``filter``, ``handler``, … into the file's globals.
"""

import inspect
import os
from contextlib import contextmanager

try:
    import _udl_host
except ImportError:  # outside the listener
    _udl_host = None

from univention.config_registry import ConfigRegistry
from univention.listener.api_adapter import ListenerModuleAdapter
from univention.listener.exceptions import ListenerModuleConfigurationError
from univention.listener.handler_configuration import ListenerModuleConfiguration
from univention.listener.handler_logging import get_logger

__all__ = ["ListenerModuleHandler"]

MODULE_DIR = "/usr/lib/univention-directory-listener"


class HandlerMetaClass(type):
    def __new__(mcs, clsname, bases, attrs):
        kls = super(HandlerMetaClass, mcs).__new__(mcs, clsname, bases, attrs)
        if kls._is_listener_module():
            kls.config = kls._get_configuration()
            module = inspect.getmodule(kls)
            for key, value in kls._adapter_class(kls.config).get_globals().items():
                setattr(module, key, value)
        return kls


class ListenerModuleHandler(object, metaclass=HandlerMetaClass):
    _metadata_attributes = (
        "createTimestamp",
        "creatorsName",
        "entryCSN",
        "entryDN",
        "entryUUID",
        "hasSubordinates",
        "modifiersName",
        "modifyTimestamp",
        "structuralObjectClass",
        "subschemaSubentry",
    )
    _adapter_class = ListenerModuleAdapter
    config = None

    def __init__(self, listener_configuration, *args, **kwargs):
        self.config = listener_configuration
        self.ucr = ConfigRegistry().load()
        self.logger = get_logger(self.config.get_name())
        self._lo = None
        self._po = None
        self._ldap_credentials = None
        if not self.config.get_active():
            self.logger.warning(
                "listener module %r deactivated by UCR listener/module/%s/deactivate",
                self.config.get_name(),
                self.config.get_name(),
            )

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, self.config.get_name())

    # What modules override.

    def create(self, dn, new):
        pass

    def modify(self, dn, old, new, old_dn):
        pass

    def remove(self, dn, old):
        pass

    def initialize(self):
        pass

    def clean(self):
        pass

    def pre_run(self):
        pass

    def post_run(self):
        pass

    def error_handler(self, dn, old, new, command, exc_type, exc_value, exc_traceback):
        """Logs the failure and re-raises it, so the listener counts the call as failed."""
        self.logger.exception("dn=%r command=%r\n    old=%r\n    new=%r", dn, command, old, new)
        raise exc_value.with_traceback(exc_traceback)

    # Helpers.

    @staticmethod
    @contextmanager
    def as_root():
        """Runs the block with effective uid 0."""
        import listener

        old_uid = os.geteuid()
        try:
            if old_uid != 0:
                listener.setuid(0)
            yield
        finally:
            if old_uid != 0:
                listener.unsetuid()

    @classmethod
    def diff(cls, old, new, keys=None, ignore_metadata=True):
        """``{attribute: (old values, new values)}`` for attributes whose value sets differ."""
        result = {}
        names = keys if keys else set(old) | set(new)
        if ignore_metadata:
            names = [name for name in names if name not in cls._metadata_attributes]
        for name in names:
            if set(old.get(name, [])) != set(new.get(name, [])):
                result[name] = (old.get(name), new.get(name))
        return result

    def _get_ldap_credentials(self):
        return self._ldap_credentials

    def _set_ldap_credentials(self, base, binddn, bindpw, host):
        self._ldap_credentials = {"base": base, "binddn": binddn, "bindpw": bindpw, "host": host}

    @property
    def lo(self):
        """LDAP connection with the listener's credentials: ``univention.admin.uldap.access``
        on UCS, a bound python-ldap connection elsewhere."""
        if self._lo is None:
            credentials = self._ldap_credentials
            if not credentials:
                raise ListenerModuleConfigurationError("no LDAP credentials received (setdata) yet")
            try:
                import univention.admin.uldap as uldap
            except ImportError:
                import ldap

                port = self.ucr.get("ldap/server/port") or self.ucr.get("ldap/master/port") or "7389"
                connection = ldap.initialize("ldap://%s:%s" % (credentials["host"], port))
                connection.simple_bind_s(credentials["binddn"], credentials["bindpw"])
                self._lo = connection
            else:
                self._lo = uldap.access(
                    host=credentials["host"],
                    base=credentials["base"],
                    binddn=credentials["binddn"],
                    bindpw=credentials["bindpw"],
                )
        return self._lo

    @property
    def po(self):
        if self._po is None:
            import univention.admin.uldap as uldap

            self._po = uldap.position(self._ldap_credentials["base"])
        return self._po

    @classmethod
    def _is_listener_module(cls):
        """Only classes defined in a module file the listener loads (or one below the UCS
        module directory) become listener modules; the base class and imports elsewhere
        stay plain classes."""
        try:
            path = inspect.getfile(cls)
        except TypeError:
            return False
        return path.startswith(MODULE_DIR) or (_udl_host is not None and _udl_host.is_module_file(path))

    @classmethod
    def _get_configuration(cls):
        conf_class = getattr(cls, "Configuration", None)
        if conf_class is None:
            raise ListenerModuleConfigurationError("class %s has no inner class 'Configuration'" % (cls.__name__,))
        if not issubclass(conf_class, ListenerModuleConfiguration):
            attributes = {k: v for k, v in vars(conf_class).items() if k not in ("__dict__", "__weakref__")}
            conf_class = type(conf_class.__name__, (ListenerModuleConfiguration,), attributes)
        return conf_class(listener_module_class=cls)
