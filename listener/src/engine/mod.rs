//! The change engine: the UCS change rules of spec listener.md §3 for one transaction at a
//! time — find the object (by cached entryUUID, then DN), decide between update, delete,
//! move (`r` stashed, completed by its `a`), delayed modify and schema update, call the
//! modules, and stage the cache writes that the main loop commits together with the id.

mod parents;
mod staged;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use cache::{Cache, CacheEntry, CacheError, MasterRecord};
use ldap::RawEntry;
use ldap::dn::{self, same_dn};
use modules::Command;
use modules::filter::CacheFilter;
use proto::Transaction;

pub use staged::Staged;

use crate::dispatch::{Handlers, Selection};
use ldap::{ALL_ATTRS, Connection, LdapFailure, Lookup, PagedSearch, Scope};

/// DN under which the subschema is read and handed to modules (spec §3.7).
pub(crate) const SUBSCHEMA_DN: &str = "cn=Subschema";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ldap(#[from] LdapFailure),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("interrupted by a stop request")]
    Interrupted,
    /// The module's own `initialize()` failed (raised, or returned something other than
    /// `None`).
    #[error("initialize() failed: {0}")]
    ModuleInit(#[source] modules::ModuleError),
    /// A module asked the listener to exit ([`Handlers::exit_requested`]).
    ///
    /// [`Handlers::exit_requested`]: crate::dispatch::Handlers::exit_requested
    #[error("a module asked the listener to exit")]
    ExitRequested,
}

impl EngineError {
    /// Retrying later may succeed (LDAP down or busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, EngineError::Ldap(e) if e.is_transient())
    }
}

/// Answers read ahead for one transaction by the pipeline; the engine uses them when its
/// own rules ask exactly these questions, and asks LDAP itself otherwise.
#[derive(Debug, Default)]
pub struct Prefetched {
    /// Base read of the transaction's DN.
    pub by_dn: Option<Lookup>,
    /// entryUUID search for the uuid cached under the DN at prefetch time.
    pub by_uuid: Option<(String, Lookup)>,
}

/// An operation in flight: the notifier's view plus what the cache knew.
#[derive(Debug, Clone)]
struct Op {
    id: u64,
    /// The notifier's DN spelling.
    dn: String,
    command: Command,
    /// Old state, and the DN it is cached under (the `r`'s DN for the `a` of a move).
    cache: Option<(String, CacheEntry)>,
    uuid: Option<String>,
}

impl Op {
    fn cached(&self) -> Option<&CacheEntry> {
        self.cache.as_ref().map(|(_, e)| e)
    }
}

/// See [`Engine::checkpoint`].
#[derive(Debug)]
pub struct Checkpoint {
    prev: Option<Op>,
    vanished_r: Option<u64>,
}

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Done: commit the staged changes with this id.
    Done,
    /// An `r` waiting for its `a`: the id must not be persisted yet (spec §2.2 step 8).
    Stashed,
}

/// Static settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub base: String,
    pub cache_filter: Option<String>,
    pub memberuid_skip: bool,
    pub uniquemember_skip: bool,
    /// Replicating roles check parents in the local LDAP (spec §3.6).
    pub checks_parents: bool,
    /// The primary never replicates the schema (spec §3.7).
    pub schema_updates: bool,
    /// `<ldap_dir>/schema/id/id`, rewritten when the schema id grows.
    pub schema_id_file: PathBuf,
}

pub struct Engine {
    settings: EngineSettings,
    cache_filter: Option<CacheFilter>,
    pub(crate) staged: Staged,
    pub(crate) handlers: Handlers,
    pub(crate) ldap: Connection,
    local: Option<Connection>,
    prev: Option<Op>,
    /// Id of the last transaction if it was an `r` whose object was already out of view:
    /// the `a` right after it ends a move from where the listener cannot read.
    vanished_r: Option<u64>,
    master: MasterRecord,
    /// Latest schema id the notifier reported.
    notifier_schema_id: u64,
    /// The schema id before a schema update that is staged but not committed: the id goes
    /// with the subschema entry, so discarding the one restores the other (else the entry
    /// would be lost while the raised id says it is stored).
    staged_schema_from: Option<u64>,
}

/// Failpoint ([`daemon::failpoint`]): a transient error right after a schema update, before
/// its transaction commits.
pub const SCHEMA_FAILPOINT: &str = "engine-after-schema";

impl Engine {
    pub fn new(
        settings: EngineSettings,
        cache: std::sync::Arc<Cache>,
        handlers: Handlers,
        ldap: Connection,
        local: Option<Connection>,
        master: MasterRecord,
    ) -> Engine {
        let cache_filter = settings
            .cache_filter
            .as_deref()
            .map(|f| CacheFilter::new(f, &settings.base));
        Engine {
            settings,
            cache_filter,
            staged: Staged::new(cache),
            handlers,
            ldap,
            local,
            prev: None,
            staged_schema_from: None,
            vanished_r: None,
            master,
            notifier_schema_id: master.schema_id,
        }
    }

    pub fn master(&self) -> MasterRecord {
        self.master
    }

    pub fn handlers(&self) -> &Handlers {
        &self.handlers
    }

    pub fn handlers_mut(&mut self) -> &mut Handlers {
        &mut self.handlers
    }

    pub(crate) fn replace_handlers(&mut self, handlers: Handlers) -> Handlers {
        std::mem::replace(&mut self.handlers, handlers)
    }

    pub fn cache(&self) -> &std::sync::Arc<Cache> {
        self.staged.cache()
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// What [`Engine::rollback`] needs to forget a processed transaction before it is
    /// committed.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            prev: self.prev.clone(),
            vanished_r: self.vanished_r,
        }
    }

    /// Forgets everything staged since `checkpoint` (its handlers have run; they run again
    /// when the transaction is retried, like UCS after a restart).
    pub(crate) fn rollback(&mut self, checkpoint: Checkpoint) {
        self.discard_staged();
        self.prev = checkpoint.prev;
        self.vanished_r = checkpoint.vanished_r;
    }

    /// Forgets the staged writes, and a schema id raised with them.
    fn discard_staged(&mut self) {
        self.staged.discard();
        if let Some(schema_id) = self.staged_schema_from.take() {
            self.master.schema_id = schema_id;
        }
    }

    /// Records the notifier's schema id; the next object found in LDAP triggers the update.
    pub fn set_notifier_schema_id(&mut self, id: u64) {
        self.notifier_schema_id = id;
    }

    /// Closes the LDAP connections (idle time, like UCS); they reopen on demand.
    pub(crate) async fn close_connections(&mut self) {
        self.ldap.close().await;
        if let Some(local) = &mut self.local {
            local.close().await;
        }
    }

    /// Stages the master record for `id` and hands out everything staged since the last
    /// commit, as one batch.
    pub(crate) fn take_batch(&mut self, id: u64) -> cache::Batch {
        self.master.notifier_id = id;
        self.take_master_batch()
    }

    /// Stages the current master record alone (startup, schema updates during init).
    pub(crate) fn take_master_batch(&mut self) -> cache::Batch {
        self.staged_schema_from = None;
        self.staged.take_batch(self.master)
    }

    /// Runs transaction `tx` through the change rules (spec §3.2–3.3). On error nothing of
    /// it is staged and a stashed `r` stays stashed, so the transaction can be retried.
    pub async fn process(
        &mut self,
        tx: &Transaction,
        prefetched: Prefetched,
    ) -> Result<Processed, EngineError> {
        self.handlers.begin_transaction(tx.id.get());
        let mut result = self.process_inner(tx, prefetched).await;
        if result.is_ok() && self.handlers.interrupted() {
            // A module's call was given up for a stop: committing would pass a change
            // the module never handled.
            result = Err(EngineError::Interrupted);
        }
        if result.is_err() {
            self.discard_staged();
        }
        result
    }

    async fn process_inner(
        &mut self,
        tx: &Transaction,
        mut prefetched: Prefetched,
    ) -> Result<Processed, EngineError> {
        let mut cur = Op {
            id: tx.id.get(),
            dn: tx.dn.clone(),
            command: tx.command,
            cache: self.staged.get(&tx.dn)?.map(|e| (tx.dn.clone(), e)),
            uuid: None,
        };
        let mut prev = self.prev.clone();
        let mut is_move = false;
        if let Some(p) = &prev {
            let consecutive =
                cur.command == Command::Add && p.command == Command::ModRdn && p.id + 1 == cur.id;
            if p.cache.is_none() {
                tracing::info!("move_to without history: {} -> {}", p.dn, cur.dn);
                is_move = consecutive;
            } else if consecutive {
                if cur.cache.is_some() {
                    tracing::warn!("move_to collision at {}", cur.dn);
                }
                cur.cache = p.cache.clone();
                cur.uuid = p.uuid.clone();
                is_move = true;
            } else {
                // UCS stops for good here ("non consecutive move") and hits the same error
                // after every restart. The object left its old DN for a place we cannot
                // know: handle it as gone, then go on with this transaction.
                tracing::warn!(
                    "non-consecutive move: {} (id {}) not followed by its add; \
                     handling it as a delete",
                    p.dn,
                    p.id
                );
                // Rare, so its subtree is always looked for: the cached
                // `hasSubordinates` may predate the children.
                if let Some((cached_dn, _)) = &p.cache {
                    self.delete_descendants(p.id, cached_dn)?;
                }
                self.delete(p)?;
                prev = None;
            }
        }
        if !is_move {
            cur.uuid = cur
                .cached()
                .and_then(CacheEntry::entry_uuid)
                .map(str::to_owned);
        }

        let mut lookup = match &cur.uuid {
            Some(uuid) => self.fetch_by_uuid(&cur.dn, uuid, &mut prefetched).await?,
            None => self.fetch_by_dn(&cur.dn, &mut prefetched).await?,
        };
        if lookup == Lookup::Missing && cur.uuid.is_some() {
            lookup = self.fetch_by_dn(&cur.dn, &mut prefetched).await?;
        }
        let vanished =
            (cur.command == Command::ModRdn && lookup == Lookup::Missing).then_some(cur.id);
        let stashed = match lookup {
            Lookup::Missing => {
                match prev.as_ref().filter(|p| is_move && p.cache.is_some()) {
                    // The object left the `r`'s DN and was gone before its `a` could be
                    // read: the modules know it under the `r`'s DN, so that is the DN whose
                    // removal they get (not the `a`'s, which they never heard of).
                    Some(moved) => {
                        // Moved where we cannot read it (an ACL-hidden subtree): its
                        // cached subtree went with it. Rare, so the subtree is always
                        // looked for: the cached `hasSubordinates` may predate children.
                        if let Some((cached_dn, _)) = &moved.cache {
                            self.delete_descendants(cur.id, cached_dn)?;
                        }
                        let gone = Op {
                            dn: moved.dn.clone(),
                            command: Command::Delete,
                            ..cur.clone()
                        };
                        self.delete(&gone)?;
                        self.staged.delete(&cur.dn);
                    }
                    None => {
                        // An `r` whose object is gone from view already moved where we
                        // cannot read it: rare, so its subtree is always looked for (the
                        // cached `hasSubordinates` may predate children); for other
                        // commands only when the cached state says it had children.
                        if let Some((cached_dn, cached)) = &cur.cache
                            && (cur.command == Command::ModRdn || has_children(&cached.attributes))
                        {
                            self.delete_descendants(cur.id, cached_dn)?;
                        }
                        self.delete(&cur)?;
                    }
                }
                None
            }
            Lookup::Found(entry) => self.update_cache(cur, entry, is_move, prev).await?,
        };
        let processed = if stashed.is_some() {
            Processed::Stashed
        } else {
            Processed::Done
        };
        self.prev = stashed;
        self.vanished_r = vanished;
        Ok(processed)
    }

    async fn fetch_by_dn(
        &mut self,
        dn: &str,
        prefetched: &mut Prefetched,
    ) -> Result<Lookup, EngineError> {
        if let Some(lookup) = prefetched.by_dn.take() {
            return Ok(lookup);
        }
        Ok(self.ldap.read_entry(dn).await?)
    }

    async fn fetch_by_uuid(
        &mut self,
        dn: &str,
        uuid: &str,
        prefetched: &mut Prefetched,
    ) -> Result<Lookup, EngineError> {
        if let Some((u, _)) = &prefetched.by_uuid
            && u.eq_ignore_ascii_case(uuid)
            && let Some((_, lookup)) = prefetched.by_uuid.take()
        {
            return Ok(lookup);
        }
        // A base read of the DN that found the object with this entryUUID is the answer the
        // subtree search would give: entryUUIDs are unique.
        if let Some(Lookup::Found(entry)) = &prefetched.by_dn
            && entry
                .first_str("entryUUID")
                .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
            && same_dn(&entry.dn, dn)
        {
            return Ok(Lookup::Found(entry.clone()));
        }
        Ok(self.ldap.find_by_uuid(&self.settings.base, uuid).await?)
    }

    /// `change_update_cache` (spec §3.3); returns the operation to stash for an `r`.
    async fn update_cache(
        &mut self,
        cur: Op,
        entry: RawEntry,
        is_move: bool,
        prev: Option<Op>,
    ) -> Result<Option<Op>, EngineError> {
        self.update_schema().await?;
        let ldap_dn = entry.dn.clone();
        match cur.command {
            Command::Modify => {
                if !same_dn(&cur.dn, &ldap_dn) {
                    tracing::info!("delaying update for {} until moved to {ldap_dn}", cur.dn);
                } else {
                    self.check_parents(&ldap_dn, false).await?;
                    self.update_entry(cur.id, entry, Command::Modify)?;
                }
            }
            Command::Add => match prev {
                Some(prev) if is_move && prev.cache.is_some() => {
                    self.process_move(cur, entry, prev).await?;
                }
                _ => {
                    if !same_dn(&cur.dn, &ldap_dn) {
                        tracing::warn!("schizophrenia: {} is now at {ldap_dn}", cur.dn);
                    }
                    // A container moved in from where we could not read it: its subtree
                    // comes into view without transactions of its own. (An add read late
                    // may show children too, but they have their own transactions.)
                    let moved_in = is_move
                        || self
                            .vanished_r
                            .is_some_and(|r| r.checked_add(1) == Some(cur.id));
                    let subtree = moved_in && has_children(&entry.attrs);
                    self.check_parents(&ldap_dn, false).await?;
                    self.update_entry(cur.id, entry, Command::Add)?;
                    if subtree {
                        self.add_descendants(cur.id, &ldap_dn).await?;
                    }
                }
            },
            Command::Delete => {
                if !same_dn(&cur.dn, &ldap_dn) {
                    tracing::warn!("resurrection: {} exists again as {ldap_dn}", cur.dn);
                }
                self.delete(&cur)?;
            }
            Command::ModRdn => {
                tracing::debug!(
                    "transaction {} (r {}) stashed until its add",
                    cur.id,
                    cur.dn
                );
                return Ok(Some(cur));
            }
            Command::Init => {
                tracing::warn!(
                    "unknown command {} for {} (id {})",
                    cur.command,
                    cur.dn,
                    cur.id
                );
            }
        }
        Ok(None)
    }

    /// Converts an LDAP entry to a cache entry, dropping duplicate `memberUid` /
    /// `uniqueMember` values when configured (spec §6.2).
    pub(crate) fn to_cache_entry(&self, entry: RawEntry) -> CacheEntry {
        let mut attributes = entry.attrs;
        for (name, values) in &mut attributes {
            let skip = (self.settings.memberuid_skip && name.eq_ignore_ascii_case("memberUid"))
                || (self.settings.uniquemember_skip && name.eq_ignore_ascii_case("uniqueMember"));
            if skip {
                let mut seen = std::collections::HashSet::new();
                values.retain(|v| seen.insert(v.clone()));
            }
        }
        CacheEntry {
            dn: entry.dn,
            attributes,
            modules: Vec::new(),
        }
    }

    /// `change_update_entry`: all modules see `entry` against the cached state, then the
    /// new state is stored.
    pub(crate) fn update_entry(
        &mut self,
        id: u64,
        entry: RawEntry,
        command: Command,
    ) -> Result<(), EngineError> {
        let mut new = self.to_cache_entry(entry);
        let old = self.staged.get(&new.dn)?.unwrap_or_default();
        let dn = new.dn.clone();
        self.handlers
            .update(id, &dn, &mut new, &old, command, Selection::All);
        self.store(new);
        Ok(())
    }

    /// `store`: cache write, unless `listener/cache/filter` excludes the object — then any
    /// older copy is removed too, so the cache never keeps a stale state (UCS kept it).
    pub(crate) fn store(&mut self, entry: CacheEntry) {
        if self.excluded(&entry) {
            self.staged.delete(&entry.dn);
        } else {
            self.staged.put(entry);
        }
    }

    /// Like [`Engine::store`], keeping only the encoded copy: for the many entries of a
    /// subtree, which are not read again in their transaction.
    fn store_encoded(&mut self, entry: &CacheEntry) {
        if self.excluded(entry) {
            self.staged.delete(&entry.dn);
        } else {
            self.staged.put_encoded(entry);
        }
    }

    /// Like [`Engine::store_encoded`] for an entry the cache does not hold yet (see
    /// [`cache::Batch::put_new`]): the bulk load of an initialisation into an empty cache.
    pub(crate) fn store_new(&mut self, entry: &CacheEntry) {
        if self.excluded(entry) {
            self.staged.delete(&entry.dn);
        } else {
            self.staged.put_new(entry);
        }
    }

    /// Whether `listener/cache/filter` keeps `entry` out of the cache.
    fn excluded(&self, entry: &CacheEntry) -> bool {
        self.cache_filter
            .as_ref()
            .is_some_and(|f| f.excludes(&entry.dn, entry.attributes.as_slice()))
    }

    /// `change_delete`: delete handlers with command `d`, whatever the notifier said, then
    /// the cache entry goes (even if a handler failed).
    fn delete(&mut self, op: &Op) -> Result<(), EngineError> {
        let mut old = op.cached().cloned().unwrap_or_default();
        self.handlers
            .delete(op.id, &op.dn, &mut old, Command::Delete);
        if let Some((cached_dn, _)) = &op.cache {
            self.staged.delete(cached_dn);
            if !same_dn(cached_dn, &op.dn) {
                self.staged.delete(&op.dn);
            }
        }
        Ok(())
    }

    /// `process_move` (spec §3.3.1): `r` for the old DN, `a` with the cached state moved to
    /// the new DN, then `m` if LDAP differs from that.
    async fn process_move(
        &mut self,
        cur: Op,
        entry: RawEntry,
        prev: Op,
    ) -> Result<(), EngineError> {
        let Some((prev_cached_dn, mut prev_old)) = prev.cache.clone() else {
            return Ok(());
        };
        let ldap_dn = entry.dn.clone();
        let is_final = same_dn(&cur.dn, &ldap_dn);
        let current_dn = if is_final { ldap_dn } else { cur.dn.clone() };

        self.staged.delete(&prev_cached_dn);
        let mut moved = prev_old.clone();
        moved.dn = current_dn.clone();
        replace_rdn_values(&mut moved, &prev.dn, &current_dn);
        set_single(&mut moved, "entryDN", current_dn.as_bytes());
        self.check_parents(&current_dn, true).await?;

        self.handlers
            .delete(prev.id, &prev.dn, &mut prev_old, Command::ModRdn);
        let empty = CacheEntry::default();
        self.handlers.update(
            cur.id,
            &current_dn,
            &mut moved,
            &empty,
            Command::Add,
            Selection::All,
        );
        self.store(moved);
        // Only the container's own `r`/`a` are numbered: its cached subtree moves with it.
        // LDAP's fresh `hasSubordinates` says whether there can be any (the cached one
        // predates children added later).
        let subtree = has_children(&entry.attrs);
        if is_final {
            self.update_entry(cur.id, entry, Command::Modify)?;
        }
        if subtree {
            self.move_descendants((prev.id, cur.id), &prev_cached_dn, &current_dn)?;
        }
        Ok(())
    }

    /// Re-keys the cached entries below `old_dn` to the same place below `new_dn` (DN and
    /// `entryDN` rewritten), staged in the container's batch so
    /// the subtree moves atomically with it. Modules with `handle_subtree_moves` get an `r`
    /// (the container's `r` id) and an `a` (its `a` id) for each, parents first; the
    /// others are not called and keep the entry under its new DN.
    fn move_descendants(
        &mut self,
        (r_id, a_id): (u64, u64),
        old_dn: &str,
        new_dn: &str,
    ) -> Result<(), EngineError> {
        let cache = std::sync::Arc::clone(self.staged.cache());
        let keys = daemon::tasks::run_blocking(|| cache.descendant_keys(old_dn))?;
        if keys.is_empty() {
            return Ok(());
        }
        tracing::info!(
            "moving {} cached descendants of {old_dn} to {new_dn}",
            keys.len()
        );
        let movers = self.handlers.subtree_movers();
        let mut moved = 0usize;
        for key in &keys {
            let Some(mut entry) = self.staged.get(key)? else {
                continue;
            };
            let Some(new) = dn::rebase(&entry.dn, old_dn, new_dn) else {
                continue;
            };
            self.staged.delete(&entry.dn);
            let mut old = (!movers.is_empty()).then(|| entry.clone());
            entry.dn = new;
            let entry_dn = entry.dn.clone();
            set_single(&mut entry, "entryDN", entry_dn.as_bytes());
            if let Some(old) = &mut old {
                self.announce_move(&movers, (r_id, a_id), old, &mut entry);
            }
            // Through the cache filter, like the container's moved state.
            self.store_encoded(&entry);
            moved += 1;
            if moved.is_multiple_of(PROGRESS_EVERY) {
                tracing::info!("moved {moved} of {} descendants of {old_dn}", keys.len());
            }
        }
        tracing::info!("moved {moved} cached descendants of {old_dn} to {new_dn}");
        Ok(())
    }

    /// The `r` + `a` of one moved descendant, for the modules in `movers` only: like the
    /// container's own move, the `r` carries the cached state, the `a` the re-keyed one.
    fn announce_move(
        &mut self,
        movers: &[usize],
        (r_id, a_id): (u64, u64),
        old: &mut CacheEntry,
        moved: &mut CacheEntry,
    ) {
        let old_dn = old.dn.clone();
        let new_dn = moved.dn.clone();
        let empty = CacheEntry::default();
        for &index in movers {
            let name = self.handlers.name(index).to_owned();
            let had = old.has_module(&name);
            self.handlers.delete_selected(
                r_id,
                &old_dn,
                old,
                Command::ModRdn,
                Selection::Only(index),
            );
            if had && !old.has_module(&name) {
                moved.remove_module(&name);
            }
            self.handlers.update(
                a_id,
                &new_dn,
                moved,
                &empty,
                Command::Add,
                Selection::Only(index),
            );
        }
    }

    /// Reads the subtree below `dn` (one paged search) and hands each entry to the modules
    /// as an add, parents first, caching it: a container moved into view brings them.
    async fn add_descendants(&mut self, id: u64, dn: &str) -> Result<(), EngineError> {
        let timeout = self.ldap.endpoint().timeout;
        let mut handle = self.ldap.handle().await?;
        let mut search = PagedSearch::start(
            &mut handle,
            dn,
            Scope::Subtree,
            "(objectClass=*)",
            &ALL_ATTRS,
            SUBTREE_PAGE_SIZE,
            timeout,
        )
        .await?;
        let base_key = dn::dn_key(dn);
        // Keys delivered so far, and entries whose parent is still to come (the server's
        // order has parents first except after moves inside the subtree).
        let mut seen: HashSet<String> = HashSet::from([base_key.clone()]);
        let mut waiting: HashMap<String, Vec<RawEntry>> = HashMap::new();
        let mut added = 0usize;
        while let Some(raw) = search.next().await? {
            let key = dn::dn_key(&raw.dn);
            if key == base_key {
                continue;
            }
            let parent_key = dn::parent(&key).unwrap_or_default().to_owned();
            if !seen.contains(&parent_key) {
                waiting.entry(parent_key).or_default().push(raw);
                continue;
            }
            let mut ready = vec![raw];
            while let Some(raw) = ready.pop() {
                let key = dn::dn_key(&raw.dn);
                self.add_one(id, raw);
                added += 1;
                if added.is_multiple_of(PROGRESS_EVERY) {
                    tracing::info!("{dn} came into view: added {added} descendants so far");
                }
                if let Some(children) = waiting.remove(&key) {
                    ready.extend(children);
                }
                seen.insert(key);
            }
        }
        search.finish().await?;
        // Entries whose parent never showed (changed meanwhile): shallowest first.
        let mut orphans: Vec<RawEntry> = waiting.into_values().flatten().collect();
        orphans.sort_by_cached_key(|e| dn::depth(&e.dn));
        for raw in orphans {
            self.add_one(id, raw);
            added += 1;
        }
        if added > 0 {
            tracing::info!("{dn} came into view with {added} descendants");
        }
        Ok(())
    }

    /// One entry of a subtree that came into view: modules see an add, the cache stores it.
    fn add_one(&mut self, id: u64, raw: RawEntry) {
        let mut new = self.to_cache_entry(raw);
        let dn = new.dn.clone();
        self.handlers.update(
            id,
            &dn,
            &mut new,
            &CacheEntry::default(),
            Command::Add,
            Selection::All,
        );
        self.store_encoded(&new);
    }

    /// Removes the cached entries below `dn`, deepest first, each announced as a delete to
    /// every module that has it (they were told it exists), with its cached state as `old`.
    fn delete_descendants(&mut self, id: u64, dn: &str) -> Result<(), EngineError> {
        let cache = std::sync::Arc::clone(self.staged.cache());
        let keys = daemon::tasks::run_blocking(|| cache.descendant_keys(dn))?;
        if keys.is_empty() {
            return Ok(());
        }
        tracing::info!("{dn} left view: removing {} cached descendants", keys.len());
        for (done, key) in keys.iter().rev().enumerate() {
            let Some(mut old) = self.staged.get(key)? else {
                continue;
            };
            let old_dn = old.dn.clone();
            self.handlers.delete(id, &old_dn, &mut old, Command::Delete);
            self.staged.delete(&old_dn);
            if (done + 1).is_multiple_of(PROGRESS_EVERY) {
                tracing::info!("removed {} of {} descendants of {dn}", done + 1, keys.len());
            }
        }
        Ok(())
    }

    /// `change_update_schema` (spec §3.7), only when the notifier's schema id grew: modules
    /// see `cn=Subschema` with `n`; the id is recorded even if the read failed, like UCS.
    pub async fn update_schema(&mut self) -> Result<(), EngineError> {
        if !self.settings.schema_updates || self.notifier_schema_id <= self.master.schema_id {
            return Ok(());
        }
        let new_id = self.notifier_schema_id;
        tracing::info!(
            "schema id {} -> {new_id}: updating the schema",
            self.master.schema_id
        );
        match self.ldap.read_entry(SUBSCHEMA_DN).await {
            Ok(Lookup::Found(mut entry)) => {
                entry.dn = SUBSCHEMA_DN.to_owned();
                self.update_entry(self.master.notifier_id, entry, Command::Init)?;
            }
            Ok(Lookup::Missing) => tracing::error!("cannot read {SUBSCHEMA_DN}: not found"),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => tracing::error!("cannot read {SUBSCHEMA_DN}: {e}"),
        }
        self.staged_schema_from.get_or_insert(self.master.schema_id);
        self.master.schema_id = new_id;
        if let Err(e) = daemon::fs::write_decimal(&self.settings.schema_id_file, new_id) {
            tracing::warn!(
                "cannot write {}: {e}",
                self.settings.schema_id_file.display()
            );
        }
        daemon::failpoint::check(SCHEMA_FAILPOINT).map_err(|e| LdapFailure::Down {
            what: "the transaction after a schema update".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(())
    }
}

/// Entries per page of the search for a subtree that came into view.
const SUBTREE_PAGE_SIZE: i32 = 1000;

/// Descendants per progress line while a subtree is moved or removed.
const PROGRESS_EVERY: usize = 10_000;

/// Whether LDAP's operational attributes say the entry has children.
fn has_children(attrs: &[(String, Vec<Vec<u8>>)]) -> bool {
    attrs.iter().any(|(name, values)| {
        let first = values.first().map(|v| v.as_slice());
        (name.eq_ignore_ascii_case("hasSubordinates")
            && first.is_some_and(|v| v.eq_ignore_ascii_case(b"TRUE")))
            || (name.eq_ignore_ascii_case("numSubordinates") && first.is_some_and(|v| v != b"0"))
    })
}

/// Replaces the values of the RDN attributes when the first RDN changed: a copy of the old
/// entry then shows the new naming value (spec §3.3.1 step 2; old values go even for a
/// rename that kept them, as in UCS).
fn replace_rdn_values(entry: &mut CacheEntry, old_dn: &str, new_dn: &str) {
    let (Some(old_rdn), Some(new_rdn)) = (dn::first_rdn_avas(old_dn), dn::first_rdn_avas(new_dn))
    else {
        return;
    };
    if !dn::rdn_differs(&old_rdn, &new_rdn) {
        return;
    }
    for ava in &new_rdn {
        set_single(entry, &ava.attr, &ava.value);
    }
}

/// Sets `attr` (found ASCII-case-insensitively, keeping the cached spelling) to one value,
/// appending the attribute if absent.
fn set_single(entry: &mut CacheEntry, attr: &str, value: &[u8]) {
    match entry
        .attributes
        .iter_mut()
        .find(|(name, _)| name.eq_ignore_ascii_case(attr))
    {
        Some((_, values)) => *values = vec![value.to_vec()],
        None => entry
            .attributes
            .push((attr.to_owned(), vec![value.to_vec()])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(attrs: &[(&str, &[&str])]) -> CacheEntry {
        CacheEntry {
            dn: "x".into(),
            attributes: attrs
                .iter()
                .map(|(n, vs)| {
                    (
                        n.to_string(),
                        vs.iter().map(|v| v.as_bytes().to_vec()).collect(),
                    )
                })
                .collect(),
            modules: vec![],
        }
    }

    #[test]
    fn rdn_values_are_replaced_only_when_the_rdn_changed() {
        let mut e = entry(&[("cn", &["old", "alias"]), ("uid", &["u"])]);
        replace_rdn_values(&mut e, "cn=old,ou=a,dc=x", "cn=old,ou=b,dc=x");
        assert_eq!(e.values("cn").unwrap().len(), 2);
        replace_rdn_values(&mut e, "cn=old,ou=a,dc=x", "CN=J\\2C Neu,ou=b,dc=x");
        assert_eq!(e.values("cn").unwrap(), [b"J, Neu".to_vec()]);
        assert_eq!(e.attributes[0].0, "cn");
        replace_rdn_values(&mut e, "cn=old,dc=x", "cn=n+sn=s,dc=x");
        assert_eq!(e.values("sn").unwrap(), [b"s".to_vec()]);
    }

    #[test]
    fn entry_dn_is_set_or_added() {
        let mut e = entry(&[("entryDN", &["cn=a"])]);
        set_single(&mut e, "entrydn", b"cn=b");
        assert_eq!(e.values("entryDN").unwrap(), [b"cn=b".to_vec()]);
        let mut e = entry(&[]);
        set_single(&mut e, "entryDN", b"cn=b");
        assert_eq!(
            e.attributes,
            [("entryDN".to_string(), vec![b"cn=b".to_vec()])]
        );
    }
}
