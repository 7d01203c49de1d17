"""The object-oriented API (``univention.listener``): a journal of user accounts.

``create``/``modify``/``remove`` instead of one ``handler``; a move arrives as one
``modify`` with the old DN; ``diff`` lists what changed without the operational
attributes. Entries go to UCR ``listener/module/user_journal/file``; the module can be
switched off with ``listener/module/user_journal/deactivate=yes``.
"""

from univention.listener import ListenerModuleHandler


class UserJournal(ListenerModuleHandler):
    class Configuration:
        name = "user_journal"
        description = "journal of user accounts (object-oriented API example)"
        ldap_filter = "(&(objectClass=inetOrgPerson)(uid=*))"
        attributes = ["uid", "cn", "sn", "mail", "description"]

    def _journal(self, line):
        path = self.ucr.get(
            "listener/module/user_journal/file", "/var/lib/univention-directory-listener/user_journal.log"
        )
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")

    def create(self, dn, new):
        uid = new["uid"][0].decode("utf-8")
        self.logger.info("user %s created", uid)
        self._journal("created %s %s" % (uid, dn))

    def modify(self, dn, old, new, old_dn):
        uid = new["uid"][0].decode("utf-8")
        if old_dn:
            self._journal("moved %s %s -> %s" % (uid, old_dn, dn))
        changes = self.diff(old, new)
        if changes:
            self._journal("modified %s %s" % (uid, ",".join(sorted(changes))))

    def remove(self, dn, old):
        self._journal("removed %s %s" % (old["uid"][0].decode("utf-8"), dn))

    def post_run(self):
        self.logger.debug("batch done")
