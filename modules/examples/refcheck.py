"""Checks the referential integrity of ``uniqueMember`` values (developer reference
§5.2.3, the object-oriented variant, for Python 3 and python-ldap 3).

One object holds the state; its bound methods are the module functions. ``setdata`` gives
the LDAP server and credentials, ``prerun``/``postrun`` open and close the connection, and
every member DN of a group is looked up. Findings go to UCR
``listener/module/refcheck/file`` (default ``/var/log/univention/refcheck.log``); the LDAP
port is UCR ``listener/module/refcheck/port`` (default 7389, UCS's local slapd).
"""

import os
from pwd import getpwnam

import ldap
import listener
import univention.debug as ud

name = "refcheck"
description = "Check referential integrity of uniqueMember relations"
filter = "(uniqueMember=*)"
# The reference spells this `attribute`, which UCS ignores; `attributes` is what was meant.
attributes = ["uniqueMember"]
modrdn = "1"


class LocalLdap(object):
    PORT = int(listener.configRegistry.get("listener/module/refcheck/port", "7389"))

    def __init__(self):
        super(LocalLdap, self).__init__()
        self.data = {}
        self.con = None

    def setdata(self, key, value):
        self.data[key] = value

    def prerun(self):
        try:
            self.con = ldap.initialize("ldap://%s:%d" % (self.data["ldapserver"], self.PORT))
            self.con.simple_bind_s(self.data["binddn"], self.data["bindpw"])
        except ldap.LDAPError as ex:
            ud.debug(ud.LISTENER, ud.ERROR, str(ex))

    def postrun(self):
        try:
            if self.con is not None:
                self.con.unbind_s()
            self.con = None
        except ldap.LDAPError as ex:
            ud.debug(ud.LISTENER, ud.ERROR, str(ex))


class LocalFile(object):
    USER = "listener"
    LOG = listener.configRegistry.get("listener/module/refcheck/file", "/var/log/univention/refcheck.log")

    def initialize(self):
        try:
            with AsRoot():
                open(self.LOG, "w").close()
                try:
                    os.chown(self.LOG, getpwnam(self.USER).pw_uid, -1)
                except KeyError:
                    pass  # no `listener` user on this host: the daemon runs as started
        except OSError as ex:
            ud.debug(ud.LISTENER, ud.ERROR, str(ex))

    def log(self, msg):
        with open(self.LOG, "a", encoding="utf-8") as log:
            print(msg, file=log)

    def clean(self):
        try:
            with AsRoot():
                os.remove(self.LOG)
        except OSError as ex:
            ud.debug(ud.LISTENER, ud.ERROR, str(ex))


class AsRoot(object):
    """Temporarily change the effective uid to root."""

    def __enter__(self):
        listener.setuid(0)

    def __exit__(self, exc_type, exc_value, traceback):
        listener.unsetuid()


class ReferentialIntegrityCheck(LocalLdap, LocalFile):
    MESSAGES = {
        (False, False): "Still invalid: ",
        (False, True): "Now valid: ",
        (True, False): "Now invalid: ",
        (True, True): "Still valid: ",
    }

    def __init__(self):
        super(ReferentialIntegrityCheck, self).__init__()
        self._delay = None

    def handler(self, dn, new, old, command=""):
        if self._delay:
            old_dn, old_entry = self._delay
            self._delay = None
            if command == "a" and old_entry.get("entryUUID") == new.get("entryUUID"):
                self.handler_move(old_dn, old_entry, dn, new)
                return
            self.handler_remove(old_dn, old_entry)

        if command == "n" and dn == "cn=Subschema":
            self.handler_schema()
        elif new and not old:
            self.handler_add(dn, new)
        elif new and old:
            self.handler_modify(dn, old, new)
        elif old and not new:
            if command == "r":
                self._delay = (dn, old)
            else:
                self.handler_remove(dn, old)

    def handler_add(self, dn, new):
        if not self._validate(new):
            self.log("New invalid object: " + dn)

    def handler_modify(self, dn, old, new):
        valid = (self._validate(old), self._validate(new))
        self.log(self.MESSAGES[valid] + dn)

    def handler_remove(self, dn, old):
        if not self._validate(old):
            self.log("Removed invalid: " + dn)

    def handler_move(self, old_dn, old, new_dn, new):
        valid = (self._validate(old), self._validate(new))
        self.log("%s %s -> %s" % (self.MESSAGES[valid], old_dn, new_dn))

    def handler_schema(self):
        self.log("Schema change")

    def _validate(self, data):
        try:
            for member in data["uniqueMember"]:
                self.con.search_ext_s(member.decode("utf-8"), ldap.SCOPE_BASE, attrlist=["1.1"], attrsonly=1)
            return True
        except ldap.NO_SUCH_OBJECT:
            return False
        except ldap.LDAPError as ex:
            ud.debug(ud.LISTENER, ud.ERROR, str(ex))
            return False


_instance = ReferentialIntegrityCheck()
initialize = _instance.initialize
handler = _instance.handler
clean = _instance.clean
prerun = _instance.prerun
postrun = _instance.postrun
setdata = _instance.setdata
