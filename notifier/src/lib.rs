//! Univention Directory Notifier: turns every LDAP write into a numbered transaction
//! (`ID DN CMD`), keeps the UCS transaction log and index, writes `cn=translog`, and serves
//! the ids to listeners over TCP 6669.
//!
//! Data flow: an intake (`intake::queue_file` or `intake::accesslog`) hands batches to the
//! `committer`, which writes `cn=translog` (`translog`), appends and fsyncs the log
//! (`journal`) and only then publishes the new last id to the `server`'s connections.

pub mod backup;
pub mod committer;
pub mod config;
pub mod intake;
pub mod journal;
pub mod metrics;
pub mod schema;
pub mod server;
pub mod translog;
