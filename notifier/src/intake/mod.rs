//! Where transactions come from: the UCS translog overlay's queue file, or stock OpenLDAP's
//! `cn=accesslog`.

pub mod accesslog;
pub mod queue_file;
