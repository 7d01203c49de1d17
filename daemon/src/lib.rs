//! Plumbing shared by both daemons and every tool, so that each job has one implementation:
//!
//! - [`ucr`]: Univention Config Registry, every layer in UCS's order;
//! - [`logging`]: journald / log file / stderr, UCS debug levels, reopen on SIGHUP;
//! - [`lock`]: POSIX record locks compatible with UCS's `lockf()`, and the holder probe;
//! - [`failpoint`]: injected faults for tests (debug builds);
//! - [`fs`]: atomic file replacement (temp file, fsync, rename, fsync directory) and the
//!   small decimal files UCS keeps (`notifier_id`, module states, schema id);
//! - [`pidfile`]: a PID file that refuses a live owner and is only removed by its owner;
//! - [`paths`]: the UCS file layout both daemons share (the notifier's queue files);
//! - [`backoff`]: exponential backoff with jitter for reconnect loops;
//! - [`time`]: RFC 3339 and LDAP generalized time without a calendar library;
//! - [`host`]: the host name as backups and tools report it;
//! - [`privileges`]: the UCS effective-uid model (real uid 0, effective `listener`);
//! - [`report`]: the error chain rule (each cause's text once);
//! - [`metrics`]: Prometheus text exposition and its HTTP endpoint;
//! - [`systemd`]: `sd_notify` states and a watchdog fed by a progress heartbeat;
//! - [`man`]: each binary's man page, rendered from its clap definition;
//! - [`tasks`]: a named task set whose shutdown awaits every task in order, and the
//!   blocking rule (see [`tasks::run_blocking`]).

pub mod backoff;
pub mod failpoint;
pub mod fs;
pub mod host;
pub mod lock;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod paths;
pub mod pidfile;
pub mod privileges;
pub mod report;
pub mod systemd;
pub mod tasks;
pub mod time;
pub mod ucr;
