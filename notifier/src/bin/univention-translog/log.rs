//! Levelled messages on stderr, gated by `-v` like the Python tool (default: warnings and
//! errors; `-v` adds info, `-vv` debug).

use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);

pub const ERROR: u8 = 1;
pub const WARNING: u8 = 2;
pub const INFO: u8 = 3;
pub const DEBUG: u8 = 4;

/// Sets the level from the number of `-v` flags.
pub fn init(verbose: u8) {
    LEVEL.store(WARNING.saturating_add(verbose), Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

pub fn emit(level: u8, args: std::fmt::Arguments<'_>) {
    if enabled(level) {
        let tag = match level {
            ERROR => "ERROR",
            WARNING => "WARNING",
            INFO => "INFO",
            _ => "DEBUG",
        };
        eprintln!("{tag}: {args}");
    }
}

macro_rules! error {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::ERROR, format_args!($($arg)*)) };
}
macro_rules! warning {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::WARNING, format_args!($($arg)*)) };
}
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::INFO, format_args!($($arg)*)) };
}
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::DEBUG, format_args!($($arg)*)) };
}
pub(crate) use {debug, error, info, warning};
