//! Parent check of replicating roles (spec listener.md §3.6): before an object is handed to
//! the modules, its missing parents are fetched from the notifier's LDAP and passed through
//! the modules with command `n`, top down, so the `replication` module can create them in
//! the local LDAP. A parent invisible to us becomes a fake container during moves.

use cache::CacheEntry;
use modules::Command;

use super::dn::{first_rdn_avas, parent, same_dn};
use super::{Engine, EngineError};
use crate::dispatch::Selection;
use ldap::Lookup;

const FAKE_DESCRIPTION: &str = "Univention Directory Listener intermediate fake object";
const FAKE_UUID: &str = "00000000-0000-0000-0000-000000000000";

impl Engine {
    /// Ensures the ancestors of `dn` below the base exist locally. Failures are logged, not
    /// returned: UCS ignores the result of this check too, and the object itself matters more.
    pub(crate) async fn check_parents(
        &mut self,
        dn: &str,
        is_move: bool,
    ) -> Result<(), EngineError> {
        if !self.settings.checks_parents {
            return Ok(());
        }
        let base = self.settings.base.clone();
        let mut missing = Vec::new();
        let mut child = dn.to_owned();
        while let Some(p) = parent(&child).map(str::to_owned) {
            if same_dn(&child, &base) || same_dn(&p, &base) || p.is_empty() {
                break;
            }
            if self.exists_locally(&p).await {
                break;
            }
            missing.push(p.clone());
            child = p;
        }
        let id = self.master.notifier_id;
        for dn in missing.into_iter().rev() {
            match self.ldap.read_entry(&dn).await {
                Ok(Lookup::Found(entry)) => self.update_entry(id, entry, Command::Init)?,
                Ok(Lookup::Missing) if is_move => self.fake_container(id, &dn)?,
                Ok(Lookup::Missing) => tracing::warn!("parent {dn} not found"),
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => tracing::error!("cannot read parent {dn}: {e}"),
            }
        }
        Ok(())
    }

    async fn exists_locally(&mut self, dn: &str) -> bool {
        let Some(local) = &mut self.local else {
            return true;
        };
        match local.read_entry(dn).await {
            Ok(Lookup::Found(_)) => true,
            Ok(Lookup::Missing) => false,
            Err(e) => {
                tracing::error!("parent check of {dn} in the local LDAP failed: {e}");
                true
            }
        }
    }

    fn fake_container(&mut self, id: u64, dn: &str) -> Result<(), EngineError> {
        let Some(avas) = first_rdn_avas(dn) else {
            tracing::error!("cannot create a fake container for {dn}: unparsable RDN");
            return Ok(());
        };
        let mut attributes: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        for ava in &avas {
            let class: &[u8] = match ava.attr.to_ascii_lowercase().as_str() {
                "cn" => b"organizationalRole",
                "ou" => b"organizationalUnit",
                "dc" => b"domain",
                other => {
                    tracing::error!("cannot create a fake container for {dn}: RDN type {other}");
                    return Ok(());
                }
            };
            attributes.push(("objectClass".into(), vec![class.to_vec()]));
            attributes.push((ava.attr.clone(), vec![ava.value.clone()]));
        }
        attributes.push(("entryDN".into(), vec![dn.as_bytes().to_vec()]));
        attributes.push((
            "description".into(),
            vec![FAKE_DESCRIPTION.as_bytes().to_vec()],
        ));
        attributes.push(("entryUUID".into(), vec![FAKE_UUID.as_bytes().to_vec()]));
        let mut fake = CacheEntry {
            dn: dn.to_owned(),
            attributes,
            modules: Vec::new(),
        };
        tracing::info!("creating fake container {dn}");
        self.handlers.update(
            id,
            dn,
            &mut fake,
            &CacheEntry::default(),
            Command::Init,
            Selection::All,
        )?;
        self.store(fake);
        Ok(())
    }
}
