"""``ListenerModuleAdapter``: turns a ``ListenerModuleHandler`` into the legacy module API
the listener calls (``name``, ``filter``, ``handler(dn, new, old, command)``, …)."""

import sys

__all__ = ["ListenerModuleAdapter"]

_DEACTIVATED_FILTER = "(objectClass=listenerModuleDeactivated)"
_SETDATA_KEYS = ("basedn", "binddn", "bindpw", "ldapserver")


class ListenerModuleAdapter(object):
    def __init__(self, module_configuration, *args, **kwargs):
        self.config = module_configuration
        self._ldap_credentials = {}
        self._instance = None
        self._rename_pending = False
        self._renamed = False
        self._saved_old = {}
        self._saved_old_dn = None

    @property
    def _module_instance(self):
        # Created once, on first use, like UCS.
        if self._instance is None:
            self._instance = self.config.get_listener_module_instance()
        return self._instance

    def get_globals(self):
        name = self.config.get_name()
        active = self.config.get_active()
        return {
            "name": name,
            "description": self.config.get_description(),
            "filter": self.config.get_ldap_filter() if active else _DEACTIVATED_FILTER,
            "attributes": list(self.config.get_attributes() or []),
            "priority": self.config.get_priority(),
            "modrdn": "1",
            "handler": self._handler,
            "initialize": self._lazy_initialize,
            "clean": self._lazy_clean,
            "prerun": self._lazy_pre_run,
            "postrun": self._lazy_post_run,
            "setdata": self._setdata,
        }

    def _setdata(self, key, value):
        self._ldap_credentials[key] = value
        if all(k in self._ldap_credentials for k in _SETDATA_KEYS):
            credentials = self._ldap_credentials
            self._module_instance._set_ldap_credentials(
                credentials["basedn"], credentials["binddn"], credentials["bindpw"], credentials["ldapserver"]
            )

    def _handler(self, dn, new, old, command):
        # Whether the previous call completed a move: only the call right after it may be
        # the listener's follow-up modify (UCS keeps the flag until some later modify).
        after_move, self._renamed = self._renamed, False
        if command == "r":
            # First half of a move: remember the old object, report it with the `a`.
            self._saved_old = old
            self._saved_old_dn = dn
            self._rename_pending = True
            return
        old_dn = None
        if command == "a" and self._rename_pending:
            old, old_dn = self._saved_old, self._saved_old_dn
            self._rename_pending = False
            self._saved_old, self._saved_old_dn = {}, None
            self._renamed = True
        instance = self._module_instance
        try:
            if old and not new:
                instance.remove(dn, old)
            elif old and new:
                if after_move and not instance.diff(old, new):
                    # The modify after a move that changed nothing but metadata.
                    return
                instance.modify(dn, old, new, old_dn)
            elif new:
                instance.create(dn, new)
        except Exception:
            exc_type, exc_value, exc_traceback = sys.exc_info()
            instance.error_handler(dn, old, new, command, exc_type, exc_value, exc_traceback)

    def _lazy_initialize(self):
        return self._module_instance.initialize()

    def _lazy_clean(self):
        return self._module_instance.clean()

    def _lazy_pre_run(self):
        return self._module_instance.pre_run()

    def _lazy_post_run(self):
        return self._module_instance.post_run()
