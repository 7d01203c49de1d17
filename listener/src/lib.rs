//! Univention Directory Listener: follows the notifier's transactions in order, fetches each
//! changed object from LDAP, compares it with the cache and calls the handler modules with
//! the UCS semantics (spec listener.md).
//!
//! Data flow: [`daemon`] asks the notifier for the next id (protocol 3: [`prefetch`] reads
//! the translog entries and objects ahead), the [`engine`] applies the change rules and
//! calls the modules through [`dispatch`], [`cascade`] writes the line for a local notifier,
//! and the cache commit carries entry, module list and id together. [`init`] initialises
//! modules that are not ready.

pub mod backup;
pub mod cascade;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dispatch;
pub mod engine;
pub mod init;
pub mod loader;
pub mod metrics;
pub mod prefetch;
pub mod signals;
pub mod tools;
