//! The listener module host: what the change engine calls for every object it processes.
//!
//! - [`module`]: the [`Module`] trait every handler module implements, native or Python;
//! - [`filter`]: the UCS filter matcher, which decides per object whether a module is called
//!   (spec listener.md §3.4, §5) and which objects stay out of the cache
//!   (`listener/cache/filter`, §6.3). It deliberately reproduces the restricted,
//!   case-sensitive C matcher of the UCS listener rather than RFC 4515 semantics, because
//!   existing modules were written against that matcher (must-match item 8);
//! - [`native`]: the built-in modules selected with `--native-module` (`jsonl`: every change
//!   as a JSON line in a file; `exec`: every change as JSON on a program's standard input).

pub mod filter;
pub mod module;
pub mod native;
pub mod python;

pub use module::{
    Attributes, Call, Command, Module, ModuleError, ModuleInfo, ModuleSource, REPLICATION,
    changed_attributes,
};
